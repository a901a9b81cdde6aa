"""The device catalog (``analysis/data/devices.yaml``): datasheet peaks, memory and links of common devices,
and the few efficiency constants of the layer-by-layer compute model, one set per kind of device.

Bundled machine profiles copy their device numbers from here (the tests check they agree), and
:func:`machine_for_device` builds a profile for a cluster of a catalog device, for what-if predictions on
hardware one has no profile for yet. :func:`efficiency` returns the constants that
:mod:`analysis.roofline` turns into seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

from larscale.machine import MachineProfile, parse_machine
from larscale.schema import from_mapping, load_yaml

CATALOG = Path(__file__).with_name("data") / "devices.yaml"


@dataclass(frozen=True)
class Device:
    kind: Literal["cpu", "gpu"]
    model: str
    peak_tflops: dict[str, float]
    memory_bandwidth_gbytes_per_s: float
    sources: list[str]
    cores: int | None = None
    compute_units: int | None = None
    memory_latency_ns: float | None = None
    memory_gb: float | None = None
    nvlink_gbytes_per_s: float | None = None


@dataclass(frozen=True)
class KindEfficiency:
    """The compute model's constants for one kind of device (meaning and sources: devices.yaml comments)."""

    matrix_efficiency: dict[str, float]     # share of the precision's peak in convolutions and FC layers
    channels_half: float                    # channels per group at which a convolution runs at half that
    grouped_conv_efficiency: float          # share of the dense rate a grouped convolution reaches
    memory_efficiency: float                # share of the datasheet bandwidth with enough bytes in flight
    bytes_in_flight_per_unit: float         # bytes one SM / core keeps in flight in memory-bound kernels
    memory_latency_ns: float                # default loaded memory latency
    host_us_per_op: float                   # host time per framework operation
    host_overlapped: bool                   # GPU: host runs ahead of the device; CPU: same cores, adds up
    kernel_us: float                        # device time every kernel costs however small
    default_flop_per_byte: float            # fp32 peak / this = bandwidth when a profile gives none
    half_efficiency_gflop_per_unit: float | None = None   # CPU core starvation (None: none)


@dataclass(frozen=True)
class KindCollectives:
    """What collectives achieve and cost on one kind of device (meaning and sources: devices.yaml comments)."""

    intra_efficiency: float                 # busbw / datasheet rate inside a node
    inter_efficiency: float                 # busbw / NIC rate across nodes, GPUDirect RDMA
    host_staging_gbytes_per_s: float        # a NIC's cap when its bytes are staged through host memory
    bucket_overhead_us: float               # framework cost per bucket
    interference: float                     # backward slowdown per second of overlapped communication
    step_jitter_cv: float                   # coefficient of variation of one rank's step time
    step_jitter_us_per_image: float         # one rank's step-time spread per image (host work), microseconds
    compute_sigma_roofline: float           # prediction intervals: relative spread of the roofline compute
    compute_sigma_measured: float           # ... of measured images/s
    scale_sigma: float                      # ... of what more than one rank adds


@dataclass(frozen=True)
class KindCompiled:
    """A compiled step's constants for one kind of device (meaning and sources: devices.yaml comments)."""

    memory_pass_share: float                # share of the memory-bound layers' passes left after fusion
    kernel_share: float                     # share of the kernels left
    host_us_per_op: float                   # host time per (eager) operation's worth of a replayed graph


@dataclass(frozen=True)
class Catalog:
    devices: dict[str, Device] = field(default_factory=dict)
    efficiency: dict[str, KindEfficiency] = field(default_factory=dict)
    collectives: dict[str, KindCollectives] = field(default_factory=dict)
    compiled: dict[str, KindCompiled] = field(default_factory=dict)


@cache
def _catalog(path: str) -> Catalog:
    return from_mapping(Catalog, load_yaml(Path(path)))


def devices(path: Path = CATALOG) -> dict[str, Device]:
    return dict(_catalog(str(path)).devices)


def _for_kind(section: str, kind: str, path: Path):
    constants = getattr(_catalog(str(path)), section)
    if kind not in constants:
        raise ValueError(f"the device catalog has no {section} constants for kind {kind!r}; it has: "
                         f"{', '.join(constants)}")
    return constants[kind]


def efficiency(kind: str, path: Path = CATALOG) -> KindEfficiency:
    """The compute model's constants for a kind of device ("cpu" or "gpu")."""
    return _for_kind("efficiency", kind, path)


def collectives(kind: str, path: Path = CATALOG) -> KindCollectives:
    """What collectives achieve and cost on a kind of device ("cpu" or "gpu")."""
    return _for_kind("collectives", kind, path)


def compiled(kind: str, path: Path = CATALOG) -> KindCompiled:
    """A compiled step's constants on a kind of device ("cpu" or "gpu")."""
    return _for_kind("compiled", kind, path)


def device(name: str, path: Path = CATALOG) -> Device:
    catalog = devices(path)
    if name not in catalog:
        raise ValueError(f"unknown device {name!r}; the catalog has: {', '.join(catalog)}")
    return catalog[name]


def machine_for_device(name: str, devices_per_node: int, inter_node_gbps: float, max_nodes: int,
                       inter_node_latency_us: float = 2.0, max_walltime: str = "24:00:00") -> MachineProfile:
    """A profile of ``max_nodes`` nodes with ``devices_per_node`` catalog devices each (one rank per device).

    Intra-node links: NVLink per direction for GPUs (half the catalog's both-ways figure), shared memory for
    CPUs. Compute: the layer-by-layer model with the catalog's bandwidth and constants (calibrate it).
    GPU nodes communicate with NCCL's hierarchical rings (``inter_node_gbps``: all of a node's interfaces).
    """
    d = device(name)
    if d.kind == "gpu" and d.nvlink_gbytes_per_s:
        intra = {"bandwidth_gbps": d.nvlink_gbytes_per_s / 2 * 8, "latency_us": 5.0, "topology": "nvlink"}
    else:
        intra = {"bandwidth_gbps": d.memory_bandwidth_gbytes_per_s / 4 * 8, "latency_us": 1.0,
                 "topology": "shared-memory"}
    doc = {
        "name": f"{name}-x{devices_per_node}", "description": f"{max_nodes} nodes of {devices_per_node} x {d.model}",
        "scheduler": "slurm", "launcher": "srun", "ranks_per_node": devices_per_node,
        # Host cores: the CPU's own for CPU devices; 8 host cores per GPU otherwise (a typical GPU node).
        "node": {"cores": (d.cores if d.kind == "cpu" and d.cores else 8) * devices_per_node,
                 "memory_gb": 64.0 * devices_per_node,
                 "devices": {"kind": d.kind, "model": d.model, "count": devices_per_node,
                             "peak_tflops": dict(d.peak_tflops),
                             "memory_bandwidth_gbytes_per_s": d.memory_bandwidth_gbytes_per_s,
                             **({"compute_units": d.compute_units} if d.compute_units else {}),
                             **({"memory_latency_ns": d.memory_latency_ns} if d.memory_latency_ns else {}),
                             **({"memory_gb": d.memory_gb} if d.memory_gb else {})}},
        "network": {"intra_node": intra,
                    "inter_node": {"bandwidth_gbps": inter_node_gbps, "latency_us": inter_node_latency_us,
                                   "topology": "fat-tree"},
                    "algorithm": "nccl" if d.kind == "gpu" else "rabenseifner",
                    # The reduction's adds stream two inputs and one output through the device's memory.
                    "reduce_gbytes_per_s": d.memory_bandwidth_gbytes_per_s / 3},
        "limits": {"max_nodes": max_nodes, "max_walltime": max_walltime},
        "sources": list(d.sources) + ["analysis/data/devices.yaml"],
    }
    return parse_machine(doc, f"device catalog: {name}")
