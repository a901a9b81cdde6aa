"""Machine profiles: the one YAML schema that `jobs/` (scripts, limits) and `analysis/` (prediction) share.

A profile describes a cluster once. Units are in the field names: ``_gbps`` gigabits per second,
``_us`` microseconds, ``_gb`` gigabytes, ``peak_tflops`` TFLOP/s per device. Bundled profiles live in
``larscale/machines/``; wherever a profile name is accepted, a path to a user's YAML file works too.
Unknown or mistyped fields are rejected with the field's path. See ``larscale/machines/README.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from larscale.schema import (
    SchemaError,
    check,
    fraction,
    from_mapping,
    load_yaml,
    non_negative,
    positive,
    to_mapping,
)

BUNDLED = Path(__file__).with_name("machines")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)$")


def _name_rule(value: str) -> str | None:
    return None if NAME.match(value) else f"use lowercase letters, digits, '-' and '_' only, got {value!r}"


def walltime_seconds(text: str) -> int:
    """``HH:MM:SS`` or ``D-HH:MM:SS`` (Slurm's forms) → seconds; ValueError names the bad value."""
    m = WALLTIME.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"walltime must be HH:MM:SS or D-HH:MM:SS, got {text!r}")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def format_walltime(seconds: float) -> str:
    """Seconds → ``HH:MM:SS`` (rounded up to the next whole second)."""
    total = int(-(-seconds // 1))
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _walltime_rule(value: str) -> str | None:
    try:
        return None if walltime_seconds(value) > 0 else "must be longer than 0 s"
    except ValueError as err:
        return str(err)


def _peak_rule(value: dict[str, float]) -> str | None:
    if "fp32" not in value:
        return "needs at least an 'fp32' entry (TFLOP/s per device)"
    bad = [k for k, v in value.items() if v <= 0]
    return f"peaks must be > 0 (bad: {', '.join(bad)})" if bad else None


def _unit_interval_rule(value: float) -> str | None:
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {value!r}"


@dataclass(frozen=True)
class Devices:
    """What one rank drives. For a CPU node this is the socket (or the whole node) itself."""

    kind: Literal["cpu", "gpu"]
    model: str
    peak_tflops: dict[str, float] = check(_peak_rule)
    count: int = check(positive, default=1)
    memory_gb: float | None = check(positive, default=None)
    # What the layer-by-layer compute model (analysis/roofline.py) needs besides the peaks; analysis/data/
    # devices.yaml has datasheet values. Unset: the model takes a default and says which, in one line.
    # Memory bandwidth of one device, GB/s (datasheet; for a CPU device, all its memory channels).
    memory_bandwidth_gbytes_per_s: float | None = check(positive, default=None)
    # Streaming multiprocessors of a GPU, cores of a CPU device: with the memory latency they bound the bytes
    # in flight, hence the bandwidth framework kernels reach (Little's law).
    compute_units: int | None = check(positive, default=None)
    # Loaded memory latency, ns (HBM ~600, DDR/MCDRAM ~150). Unset: 600 for a GPU, 150 for a CPU.
    memory_latency_ns: float | None = check(positive, default=None)


@dataclass(frozen=True)
class Node:
    cores: int = check(positive)
    memory_gb: float = check(positive)
    devices: Devices


@dataclass(frozen=True)
class Link:
    bandwidth_gbps: float = check(positive)
    latency_us: float = check(non_negative)
    topology: str = "flat"
    # Share of this link's transfer time (its α and β terms) that can run beside the backward pass, 0..1.
    # 1.0 (default): a network link, where the NIC and the wire take the time and the cores only hand over
    # buffers (also a GPU link: NVLink/PCIe copies by DMA engines). 0.0: shared memory on a node whose cores
    # all compute — there the cores themselves copy every byte, so transfer time is compute-core time.
    overlap_fraction: float = check(_unit_interval_rule, default=1.0)

    @property
    def beta_s_per_byte(self) -> float:
        """β of the α-β model: seconds per byte (gigabits → bytes: ÷ 8)."""
        return 8.0 / (self.bandwidth_gbps * 1e9)

    @property
    def alpha_s(self) -> float:
        return self.latency_us * 1e-6


@dataclass(frozen=True)
class Collectives:
    """What collectives achieve and cost beside the links' datasheet rates (analysis/comm.py, analysis/overlap.py).

    Unset fields take the device kind's constants (analysis/data/devices.yaml, ``collectives:``, with their public
    sources); a CPU kind keeps its links' own (calibrated) rates and no extra costs.
    """

    # busbw of a large allreduce over the link's datasheet rate: inside a node (NVLink, PCIe) and across nodes.
    intra_efficiency: float | None = check(fraction, default=None)
    inter_efficiency: float | None = check(fraction, default=None)
    # NICs per node; inter_node.bandwidth_gbps is all of them together (8 GPUs may share one NIC).
    nics_per_node: int | None = check(positive, default=None)
    # GPUDirect RDMA (the NIC reads and writes GPU memory); false: staged through host memory (a NIC on the
    # CPU's PCIe, or no peer-memory module), which caps each NIC at host_staging_gbytes_per_s.
    gpudirect_rdma: bool = True
    host_staging_gbytes_per_s: float | None = check(positive, default=None)
    # Framework cost per bucket (DDP's bucket launch, Horovod's negotiation and fusion kernels), microseconds.
    bucket_overhead_us: float | None = check(non_negative, default=None)
    # Share of the communication overlapped with the backward pass by which that pass slows (SMs and memory
    # bandwidth the collective kernels take).
    interference: float | None = check(_unit_interval_rule, default=None)
    # Coefficient of variation of one rank's step time: a synchronous step waits for the slowest rank.
    step_jitter_cv: float | None = check(non_negative, default=None)
    # Standard deviation of one rank's step time per image it processes (microseconds per image): the host's
    # per-image work (decode, augmentation, host-to-device copy), whose spread does not shrink with the GPU's.
    step_jitter_us_per_image: float | None = check(non_negative, default=None)
    # The measured images/s already waited for the slowest of this many side-by-side runs (calibration's
    # paced runs): the model adds only the wait beyond it.
    jitter_included_ranks: int = check(positive, default=1)
    # Width of the gradients on the wire: fp32 (mixed precision keeps fp32 gradients) or 16-bit compression.
    gradient_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"


@dataclass(frozen=True)
class Network:
    intra_node: Link
    inter_node: Link
    # γ of the α-β-γ model: bytes reduced per second by one rank (GB/s). Default: 10 GB/s, a memory-bound
    # float add on one core streaming two inputs and one output; calibration replaces it.
    reduce_gbytes_per_s: float = check(positive, default=10.0)
    # Horovod's fusion buffer (HOROVOD_FUSION_THRESHOLD, default 64 MiB) and cycle time (default 1 ms;
    # 3.5 ms before 0.21): gradients are packed into buckets of at most this size every cycle.
    fusion_buffer_mb: float = check(positive, default=64.0)
    cycle_time_ms: float = check(non_negative, default=1.0)
    algorithm: Literal["ring", "recursive_doubling", "rabenseifner", "binomial_tree", "hierarchical",
                       "nccl"] = "ring"
    # Share of the reduction (the γ term: adding the received vectors) that can run beside the backward pass,
    # 0..1. 1.0 (default): the reduction has hardware of its own — GPU SMs that NCCL takes beside the kernels,
    # or CPU cores reserved for communication (Intel MLSL / Caffe on KNL and SKX). 0.0: CPU ranks that compute
    # on every core, where the adds run on those cores. See analysis/overlap.py for the model.
    reduce_overlap_fraction: float = check(_unit_interval_rule, default=1.0)
    # Rate (GB/s) of one copy into or out of Horovod's fusion buffer: a bucket of two or more tensors is
    # copied in before its allreduce and out after it (a lone tensor is reduced in place). Unset: not
    # modelled (GPU device copies at HBM speed are negligible); a CPU core copies at memcpy speed, a few GB/s.
    # `larscale calibrate` fits it from bench-hvd's horovod_allreduce_fused rows.
    fusion_copy_gbytes_per_s: float | None = check(positive, default=None)
    # When Horovod's allreduces can start. "layerwise" (default): each gradient's hook fires as the backward
    # pass produces it, so buckets overlap the rest of the backward pass. "none": every gradient becomes ready
    # when the backward pass ends (a backward compiled as one graph by torch.compile returns all gradients at
    # once), so all communication follows the backward pass.
    overlap: Literal["layerwise", "none"] = "layerwise"
    # Achieved bandwidth, framework costs, jitter and gradient width of the collectives.
    collectives: Collectives = field(default_factory=Collectives)

    @property
    def gamma_s_per_byte(self) -> float:
        return 1.0 / (self.reduce_gbytes_per_s * 1e9)

    @property
    def fusion_copy_s_per_byte(self) -> float:
        return 0.0 if self.fusion_copy_gbytes_per_s is None else 1.0 / (self.fusion_copy_gbytes_per_s * 1e9)


@dataclass(frozen=True)
class WalltimeBin:
    """A queue limit that depends on the job's size: jobs of min_nodes..max_nodes nodes run at most max_walltime
    (Frontier and Polaris publish their limits this way)."""

    min_nodes: int = check(positive)
    max_walltime: str = check(_walltime_rule)
    max_nodes: int | None = check(positive, default=None)     # unset: no upper end

    def covers(self, nodes: int) -> bool:
        return self.min_nodes <= nodes and (self.max_nodes is None or nodes <= self.max_nodes)

    @property
    def nodes_text(self) -> str:
        return f"{self.min_nodes}+" if self.max_nodes is None else f"{self.min_nodes}-{self.max_nodes}"


@dataclass(frozen=True)
class Limits:
    max_nodes: int = check(positive)
    max_walltime: str = check(_walltime_rule)
    max_jobs: int | None = check(positive, default=None)
    # Walltime limits by node count; a job size no bin covers gets max_walltime.
    walltime_bins: list[WalltimeBin] = field(default_factory=list)
    # Seconds between two status queries of the scheduler (unset: the scheduler's minimum, 30 s for batch
    # systems). Only a private test cluster should set less.
    poll_interval_s: float | None = check(non_negative, default=None)

    @property
    def max_walltime_s(self) -> int:
        return walltime_seconds(self.max_walltime)

    def walltime_limit(self, nodes: int) -> tuple[int, str]:
        """(seconds, text naming the limit) for a job of ``nodes`` nodes: the first bin that covers it, else
        max_walltime."""
        for i, b in enumerate(self.walltime_bins):
            if b.covers(nodes):
                return walltime_seconds(b.max_walltime), (f"{b.max_walltime} for {b.nodes_text} nodes "
                                                          f"(limits.walltime_bins[{i}])")
        return self.max_walltime_s, self.max_walltime


def _container_word_rule(value: str) -> str | None:
    if not value or not value.isprintable() or any(c.isspace() or c == "," for c in value) or len(value) > 400:
        return f"one printable word without spaces or ',' (at most 400 characters), got {value!r}"
    return None


def _binds_rule(value: list[str]) -> str | None:
    return next((f"[{i}]: {_container_word_rule(v)}" for i, v in enumerate(value) if _container_word_rule(v)), None)


@dataclass(frozen=True)
class Container:
    """Run every rank inside a container image. apptainer/singularity: ``exec --nv`` (``--rocm`` on AMD GPUs)
    with ``--bind``; pyxis: srun's ``--container-image`` (enroot); podman-hpc: ``run --gpu``; shifter:
    ``--image`` and the ``shifter`` wrapper (jobs/containers.py)."""

    runtime: Literal["apptainer", "singularity", "pyxis", "podman-hpc", "shifter"]
    image: str = check(_container_word_rule)
    # host_path[:container_path[:options]]
    binds: list[str] = check(_binds_rule, default_factory=list)


@dataclass(frozen=True)
class Charge:
    """What the allocation is charged: ``factor`` units per node-hour (NERSC charges GPU node-hours x 1, ...)."""

    factor: float = check(positive)
    unit: str = "node-hours"


@dataclass(frozen=True)
class Compute:
    """How the analysis turns FLOPs into seconds when no measurement exists."""

    # "roofline" (default): each layer of the network takes the longer of its FLOPs at the precision's peak
    # times an efficiency for its kind of layer and its bytes at the memory bandwidth reached, plus the
    # optimizer's memory passes and the framework's per-operation costs (analysis/roofline.py; constants in
    # analysis/data/devices.yaml). "sustained": the whole step at sustained_fraction of peak (the older model,
    # kept for profiles fitted with it).
    model: Literal["roofline", "sustained"] = "roofline"
    # roofline: "eager" (kernel by kernel, the host launching each) or "compiled" (torch.compile / CUDA graphs:
    # element-wise passes fused, launches replayed; analysis/data/devices.yaml, ``compiled:``).
    mode: Literal["eager", "compiled"] = "eager"
    # roofline: measured ÷ modelled rate, 1 unless calibration fitted it (`larscale calibrate`).
    efficiency_scale: float = check(positive, default=1.0)
    # roofline: host seconds per framework operation (µs) that launches the kernels; unset: the device kind's
    # constant for eager PyTorch. A compiled step (CUDA graphs) pays far less.
    host_us_per_op: float | None = check(non_negative, default=None)
    # sustained: fraction of fp32 peak sustained by training at a large per-device batch.
    sustained_fraction: float = check(fraction, default=0.3)
    # The same for other precisions' peaks (tensor cores sustain a much smaller share of their peak);
    # a precision not listed uses sustained_fraction.
    sustained_fraction_by_precision: dict[str, float] = check(lambda v: next(
        (f"{k}: must be in (0, 1], got {x!r}" for k, x in v.items() if not 0 < x <= 1), None), default_factory=dict)
    # Per-device batch at which efficiency is half its large-batch value: small batches starve the cores.
    # Unset: 4 images with model "sustained"; with "roofline", half_efficiency_gflop or the device kind's
    # constant (CPU cores starve at a few GFLOP of work per core per step; a GPU's small-batch cost is its
    # per-kernel and host launch time instead, so none).
    half_efficiency_batch: float | None = check(non_negative, default=None)
    # The same point as work instead of images: GFLOP per device per step at which efficiency is half its
    # large-batch value. When set it replaces half_efficiency_batch, as this value / the model's GFLOP per
    # image, so one number serves networks of different per-image cost.
    half_efficiency_gflop: float | None = check(positive, default=None)
    # Images per second one node's data loaders deliver (decode + augment + copy), all its loader processes
    # together. Unset: unlimited (data loading is never the bottleneck). benchmarks/bench_data.py measures
    # the rate of one loader process; a node's rate is about that × the cores given to loading.
    data_images_per_s: float | None = check(positive, default=None)
    # Measured per-device images/s by model and per-device batch (from calibration or users).
    measured_images_per_s: dict[str, dict[int, float]] = field(default_factory=dict)
    # The precision those were measured at (`larscale calibrate` writes its runs'): a prediction at another one
    # (bf16 on a CPU calibrated with fp32 runs) leaves them aside for the model at that precision's peak.
    # Unset: they stand for any precision.
    measured_precision: str | None = None
    # Fixed per-iteration overhead per rank (optimizer step, framework), seconds.
    step_overhead_s: float = check(non_negative, default=0.0)
    # How much faster a device runs when the node's other devices idle (fewer ranks per node than the profile's
    # ranks_per_node) than when all are busy, as measured images/s are: shared memory bandwidth and caches,
    # turbo clocks. 1 (default): no difference. `larscale calibrate` measures it from runs alone beside the
    # same runs side by side.
    partial_node_speedup: float = check(positive, default=1.0)
    # Whether data loading runs ahead of the step (prefetching workers): then only the part of data_s that
    # exceeds the step's compute and communication is exposed; otherwise data_s adds to every iteration.
    data_overlapped: bool = True


@dataclass(frozen=True)
class MachineProfile:
    name: str = check(_name_rule)
    # A registered scheduler and launcher (jobs/schedulers/, jobs/launchers.py: the one list of each, checked
    # when a sweep is planned; the analysis needs neither).
    scheduler: str = check(_name_rule)
    launcher: str = check(_name_rule)
    node: Node
    network: Network
    limits: Limits
    description: str = ""
    # Flavour of mpirun when launcher is mpirun: Open MPI and Intel MPI bind differently.
    mpi_flavor: Literal["openmpi", "intelmpi", "mvapich"] = "openmpi"
    launcher_flags: list[str] = field(default_factory=list)
    ranks_per_node: int | None = check(positive, default=None)
    compute: Compute = field(default_factory=Compute)
    # Shell lines copied into job scripts before the launch (trusted like a shell script); prefer modules and
    # environment below, which are quoted.
    env: list[str] = field(default_factory=list)
    # `module load` of these modules, then these environment variables (values quoted), in every job script.
    modules: list[str] = check(lambda v: next((f"[{i}]: a module name is one word, got {m!r}" for i, m in enumerate(v)
                                               if not m or not m.isprintable() or any(c.isspace() for c in m)), None),
                               default_factory=list)
    environment: dict[str, str] = check(lambda v: next(
        (f"{k}: a variable name is letters, digits and '_', not starting with a digit" for k in v
         if not ENV_NAME.match(k)), None) or next((f"{k}: must not contain a NUL byte" for k, x in v.items()
                                                   if "\0" in x), None), default_factory=dict)
    # Free-form scheduler options written among the directives (-C gpu, --exclusive, -l filesystems=...); each
    # scheduler validates them (jobs/schedulers/).
    site_lines: list[str] = field(default_factory=list)
    # GPUs requested as Slurm --gpus-per-node=N or --gres=gpu:N (sites differ in which they honour).
    gpu_request: Literal["gpus-per-node", "gres"] = "gpus-per-node"
    container: Container | None = None
    # What a node-hour costs in the allocation's units (sweep plan and plan print it beside node-hours).
    charge: Charge | None = None
    # Defaults for job scripts; a sweep spec may override them.
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    # Written by `larscale calibrate`: the fit, its residuals and what it was fitted from.
    calibration: dict[str, Any] | None = None
    sources: list[str] = field(default_factory=list)

    @property
    def devices_per_node(self) -> int:
        return self.node.devices.count

    @property
    def default_ranks_per_node(self) -> int:
        """One rank per device unless the profile says otherwise."""
        return self.ranks_per_node or self.node.devices.count

    def max_walltime_for(self, nodes: int) -> tuple[int, str]:
        """The longest walltime (seconds) a job of ``nodes`` nodes may ask for, and the limit's text for a
        refusal (``06:00:00 for 1-9 nodes (limits.walltime_bins[0])``)."""
        return self.limits.walltime_limit(nodes)

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def bundled_machines() -> list[str]:
    return sorted(p.stem for p in BUNDLED.glob("*.yaml"))


def parse_machine(data: Any, source: str | None = None) -> MachineProfile:
    try:
        return from_mapping(MachineProfile, data)
    except SchemaError as err:
        raise SchemaError(err.path, err.reason, source) from None


def load_machine(name_or_path: str | Path) -> MachineProfile:
    """A bundled profile by name, or a user's YAML file by path. Errors name the culprit."""
    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix in (".yaml", ".yml") or "/" in text or path.exists()):
        path = BUNDLED / f"{text}.yaml"
        if not path.exists():
            raise SchemaError("", f"unknown machine {text!r}; bundled: {', '.join(bundled_machines())} "
                              "(or give a path to a profile YAML)")
    elif not path.exists():
        raise SchemaError("", "machine profile file does not exist", text)
    return parse_machine(load_yaml(path), str(path))
