"""The time model's parameters, explicit and flat: what a machine profile says, and what calibration fits.

:class:`PerfParams` gathers every number the model uses (α, β per link, γ, peak FLOP/s, sustained
efficiency, half-efficiency batch, fusion buffer, cycle time, overlappable share of communication, data
rate, step overhead). It is derived from a :class:`~larscale.machine.MachineProfile` by
:meth:`PerfParams.from_machine`; a least-squares fit replaces fields with :func:`dataclasses.replace` and
hands the result to :func:`analysis.predict.predict_from`, so the fitted model and the predicting model are
the same code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from analysis.comm import LinkCost, check_algorithm
from analysis.roofline import DeviceRates, memory_rate
from larscale.machine import MachineProfile

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "fp8")
# Precisions whose activations are stored in 16 bits (fp8 training keeps 16-bit activations).
HALF_WIDTH = ("bf16", "fp16", "fp8")
COMPUTE_MODELS = ("roofline", "sustained")
COMPUTE_MODES = ("eager", "compiled")
OVERLAP_MODES = ("layerwise", "none")


@dataclass(frozen=True)
class PerfParams:
    """All parameters of the iteration-time model (SI units: seconds, bytes, FLOP/s)."""

    link: LinkCost
    algorithm: str
    fusion_bytes: float
    cycle_s: float
    peak_flops_per_device: float
    devices_per_node: int
    sustained_fraction: float
    half_efficiency_batch: float
    half_efficiency_flops: float | None = None
    step_overhead_s: float = 0.0
    data_images_per_s_per_node: float = math.inf
    data_overlapped: bool = True
    # Shares of the intra-node link's, the inter-node link's and the reduction's time that can run beside
    # the backward pass (the rest occupies the compute cores; analysis/overlap.py).
    overlap_intra: float = 1.0
    overlap_inter: float = 1.0
    overlap_reduce: float = 1.0
    # δ: seconds per byte of one copy into or out of Horovod's fusion buffer (0: not modelled). Its
    # compute-core share is the reduction's (analysis/overlap.py).
    copy_s_per_byte: float = 0.0
    measured_images_per_s: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    max_nodes: int | None = None
    default_ranks_per_node: int = 1
    machine: str = ""
    # The compute model (analysis/compute.py): "sustained" = F·(b + h)/(d·P·s); "roofline" = layer by layer
    # from ``rates`` (analysis/roofline.py), divided by ``efficiency_scale``, × (1 + h/x) at per-device batch x,
    # and at least the host's launch time (``host_s_per_op`` per framework operation; on CPUs it adds).
    compute_model: str = "sustained"
    rates: DeviceRates | None = None
    efficiency_scale: float = 1.0
    host_s_per_op: float = 0.0
    host_overlapped: bool = True
    # "layerwise": gradients ready layer by layer in the backward pass; "none": all at its end.
    overlap: str = "layerwise"
    # A device's speed-up when its node is only partly busy (fewer ranks per node than the default).
    partial_node_speedup: float = 1.0
    # Framework seconds per bucket (DDP's bucket launch, Horovod's negotiation), added to each collective.
    bucket_overhead_s: float = 0.0
    # Seconds the backward pass loses per second of communication overlapped with it (analysis/overlap.py).
    interference: float = 0.0
    # Coefficient of variation of one rank's step time: a synchronous step waits for the slowest of p ranks.
    jitter_cv: float = 0.0
    # Seconds of one rank's step-time standard deviation per image it processes (the host's per-image work),
    # combined with ``jitter_cv · compute`` in quadrature (independent sources).
    jitter_s_per_image: float = 0.0
    # Ranks whose slowest step the compute measurement already includes (calibration's side-by-side runs).
    jitter_included_ranks: int = 1
    # Bytes on the wire per fp32 gradient byte: 1 (fp32 gradients, as mixed precision keeps them) or 0.5
    # (fp16/bf16 compression).
    gradient_scale: float = 1.0
    # Prediction intervals: relative standard deviations (of the log) of the compute (roofline or measured
    # images/s) and of what more than one rank adds (analysis/predict.py); 0 gives a band of zero width.
    compute_sigma_roofline: float = 0.0
    compute_sigma_measured: float = 0.0
    scale_sigma: float = 0.0
    # What the profile did not say and the model assumed (one line each; the CLI prints them).
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        check_algorithm(self.algorithm)
        if self.compute_model not in COMPUTE_MODELS:
            raise ValueError(f"PerfParams.compute_model must be one of {', '.join(COMPUTE_MODELS)}, "
                             f"got {self.compute_model!r}")
        if self.compute_model == "roofline" and self.rates is None:
            raise ValueError("PerfParams.compute_model 'roofline' needs rates (DeviceRates)")
        if self.overlap not in OVERLAP_MODES:
            raise ValueError(f"PerfParams.overlap must be one of {', '.join(OVERLAP_MODES)}, got {self.overlap!r}")
        if not self.partial_node_speedup > 0:
            raise ValueError(f"PerfParams.partial_node_speedup must be > 0, got {self.partial_node_speedup!r}")
        if not self.efficiency_scale > 0:
            raise ValueError(f"PerfParams.efficiency_scale must be > 0, got {self.efficiency_scale!r}")
        if not self.host_s_per_op >= 0:
            raise ValueError(f"PerfParams.host_s_per_op must be >= 0, got {self.host_s_per_op!r}")
        for name in ("fusion_bytes", "peak_flops_per_device", "sustained_fraction", "data_images_per_s_per_node"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PerfParams.{name} must be > 0, got {getattr(self, name)!r}")
        if self.half_efficiency_flops is not None and not self.half_efficiency_flops > 0:
            raise ValueError(f"PerfParams.half_efficiency_flops must be > 0, got {self.half_efficiency_flops!r}")
        for name in ("cycle_s", "half_efficiency_batch", "step_overhead_s", "copy_s_per_byte"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"PerfParams.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("bucket_overhead_s", "interference", "jitter_cv", "jitter_s_per_image",
                     "compute_sigma_roofline", "compute_sigma_measured", "scale_sigma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"PerfParams.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.jitter_included_ranks >= 1:
            raise ValueError(f"PerfParams.jitter_included_ranks must be >= 1, got {self.jitter_included_ranks!r}")
        if self.gradient_scale not in (0.5, 1.0):
            raise ValueError(f"PerfParams.gradient_scale must be 1 (fp32) or 0.5 (16-bit), got {self.gradient_scale!r}")
        for name in ("overlap_intra", "overlap_inter", "overlap_reduce"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"PerfParams.{name} must be in [0, 1], got {getattr(self, name)!r}")

    @classmethod
    def from_machine(cls, machine: MachineProfile, precision: str = "fp32",
                     compute_mode: str | None = None) -> PerfParams:
        """``compute_mode`` ("eager" or "compiled") replaces the profile's ``compute.mode``."""
        devices = machine.node.devices
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
        mode = machine.compute.mode if compute_mode is None else compute_mode
        if mode not in COMPUTE_MODES:
            raise ValueError(f"unknown compute mode {mode!r}; known: {', '.join(COMPUTE_MODES)}")
        if precision not in devices.peak_tflops:
            if devices.kind == "cpu" and precision in HALF_WIDTH:
                raise ValueError(cpu_precision_refusal(machine, precision))
            # A GPU without faster math for this precision (fp16 on a P100 profile without it): fp32 rate.
            precision = "fp32"
        net = machine.network
        compute = machine.compute
        roofline = compute_settings(machine, precision, mode) if compute.model == "roofline" else None
        if compute.model == "roofline":
            half_batch, half_flops = roofline.half_batch, roofline.half_flops
        else:
            half_batch = 4.0 if compute.half_efficiency_batch is None else compute.half_efficiency_batch
            half_flops = None if compute.half_efficiency_gflop is None else compute.half_efficiency_gflop * 1e9
        achieved = collective_settings(machine)
        return cls(
            link=LinkCost(alpha_intra_s=net.intra_node.alpha_s,
                          beta_intra_s_per_byte=net.intra_node.beta_s_per_byte / achieved.intra_efficiency,
                          alpha_inter_s=net.inter_node.alpha_s,
                          beta_inter_s_per_byte=net.inter_node.beta_s_per_byte / achieved.inter_efficiency,
                          gamma_s_per_byte=net.gamma_s_per_byte),
            bucket_overhead_s=achieved.bucket_overhead_s, interference=achieved.interference,
            jitter_cv=achieved.jitter_cv, jitter_s_per_image=achieved.jitter_s_per_image,
            jitter_included_ranks=machine.network.collectives.jitter_included_ranks,
            gradient_scale=achieved.gradient_scale,
            compute_sigma_roofline=achieved.compute_sigma_roofline,
            compute_sigma_measured=achieved.compute_sigma_measured, scale_sigma=achieved.scale_sigma,
            algorithm=net.algorithm,
            fusion_bytes=net.fusion_buffer_mb * 2**20,
            cycle_s=net.cycle_time_ms * 1e-3,
            peak_flops_per_device=devices.peak_tflops[precision] * 1e12,
            devices_per_node=devices.count,
            sustained_fraction=compute.sustained_fraction_by_precision.get(precision, compute.sustained_fraction),
            half_efficiency_batch=half_batch,
            half_efficiency_flops=half_flops,
            step_overhead_s=compute.step_overhead_s,
            data_images_per_s_per_node=compute.data_images_per_s or math.inf,
            data_overlapped=compute.data_overlapped,
            overlap_intra=net.intra_node.overlap_fraction,
            overlap_inter=net.inter_node.overlap_fraction,
            overlap_reduce=net.reduce_overlap_fraction,
            copy_s_per_byte=net.fusion_copy_s_per_byte,
            measured_images_per_s={k: dict(v) for k, v in compute.measured_images_per_s.items()}
            if compute.measured_precision in (None, precision) else {},
            max_nodes=machine.limits.max_nodes,
            default_ranks_per_node=machine.default_ranks_per_node,
            machine=machine.name,
            compute_model=compute.model,
            rates=None if roofline is None else roofline.rates,
            efficiency_scale=compute.efficiency_scale,
            host_s_per_op=0.0 if roofline is None else roofline.host_s_per_op,
            host_overlapped=True if roofline is None else roofline.host_overlapped,
            overlap=net.overlap,
            partial_node_speedup=compute.partial_node_speedup,
            notes=() if roofline is None else roofline.notes,
        )

    def half_batch(self, flops_per_image: float, devices_per_rank=1.0):
        """h in images per rank: ``half_efficiency_batch``, or the work-based point ``W·d/F`` when given."""
        if self.half_efficiency_flops is None:
            return self.half_efficiency_batch
        return self.half_efficiency_flops * devices_per_rank / flops_per_image

    def serial_link(self) -> LinkCost:
        """The parameters' shares that occupy the compute cores: α, β of each link and γ times ``1 − overlap``.

        Collective times are linear in (α_i, α_e, β_i, β_e, γ), so a collective's compute-core seconds are its
        cost formula evaluated with these (:func:`analysis.comm.allreduce_affine`).
        """
        link = self.link
        return LinkCost(alpha_intra_s=link.alpha_intra_s * (1.0 - self.overlap_intra),
                        beta_intra_s_per_byte=link.beta_intra_s_per_byte * (1.0 - self.overlap_intra),
                        alpha_inter_s=link.alpha_inter_s * (1.0 - self.overlap_inter),
                        beta_inter_s_per_byte=link.beta_inter_s_per_byte * (1.0 - self.overlap_inter),
                        gamma_s_per_byte=link.gamma_s_per_byte * (1.0 - self.overlap_reduce))

    def replace(self, **changes) -> PerfParams:
        """A copy with some fields changed (``link`` fields may be given by name: ``alpha_inter_s=...``)."""
        link_fields = {f.name for f in dataclasses.fields(LinkCost)}
        link_changes = {k: changes.pop(k) for k in list(changes) if k in link_fields}
        if link_changes:
            changes["link"] = dataclasses.replace(self.link, **link_changes)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CollectiveSettings:
    """A profile's collectives section with the device kind's constants filled in (analysis/comm.py)."""

    intra_efficiency: float          # busbw / datasheet rate inside a node
    inter_efficiency: float          # busbw / NIC rate across nodes, host staging included
    bucket_overhead_s: float
    interference: float
    jitter_cv: float
    jitter_s_per_image: float
    gradient_scale: float
    compute_sigma_roofline: float
    compute_sigma_measured: float
    scale_sigma: float


def links_calibrated(machine: MachineProfile) -> bool:
    """Whether calibration fitted the profile's links (``calibration.network``): their rates are achieved ones."""
    return bool(machine.calibration and "network" in machine.calibration)


def collective_settings(machine: MachineProfile) -> CollectiveSettings:
    """Achieved-bandwidth factors and collective costs: the profile's ``network.collectives``, else the kind's.

    A profile whose links calibration fitted (``calibration.network``) already states achieved rates: its
    efficiencies stay 1.
    """
    from analysis.devices import collectives

    kind = collectives(machine.node.devices.kind)
    given = machine.network.collectives
    fitted_links = links_calibrated(machine)

    def pick(name: str) -> float:
        value = getattr(given, name)
        return float(getattr(kind, name) if value is None else value)

    intra, inter = pick("intra_efficiency"), pick("inter_efficiency")
    if not given.gpudirect_rdma:
        # Host staging caps each NIC (inter_node.bandwidth_gbps is all of a node's NICs together).
        nic_gbytes_per_s = machine.network.inter_node.bandwidth_gbps / 8 / (given.nics_per_node or 1)
        inter = min(inter, pick("host_staging_gbytes_per_s") / nic_gbytes_per_s)
    if fitted_links:
        intra = inter = 1.0
    measured_sigma = kind.compute_sigma_measured
    calibrated = (machine.calibration or {}).get("compute") or {}
    if isinstance(calibrated.get("rms_relative_residual"), (int, float)) and math.isfinite(
            calibrated["rms_relative_residual"]):
        # A calibrated profile's own fit residuals, no tighter than the kind's measured spread.
        measured_sigma = max(measured_sigma, float(calibrated["rms_relative_residual"]))
    return CollectiveSettings(intra_efficiency=intra, inter_efficiency=inter,
                              bucket_overhead_s=pick("bucket_overhead_us") * 1e-6, interference=pick("interference"),
                              jitter_cv=pick("step_jitter_cv"),
                              jitter_s_per_image=pick("step_jitter_us_per_image") * 1e-6,
                              gradient_scale=1.0 if given.gradient_dtype == "fp32" else 0.5,
                              compute_sigma_roofline=kind.compute_sigma_roofline,
                              compute_sigma_measured=measured_sigma, scale_sigma=kind.scale_sigma)


@dataclass(frozen=True)
class RooflineSettings:
    """What the roofline compute model takes from a profile and the device catalog's constants."""

    rates: DeviceRates
    host_s_per_op: float
    host_overlapped: bool
    half_batch: float
    half_flops: float | None
    notes: tuple[str, ...]


def cpu_precision_refusal(machine: MachineProfile, precision: str) -> str:
    """Why ``precision`` cannot be predicted on ``machine``'s CPUs: their profile has no peak for it."""
    devices = machine.node.devices
    has = ", ".join(devices.peak_tflops)
    if precision == "bf16":
        return (f"--precision bf16: machine {machine.name!r} ({devices.model}) has no bf16 peak (node.devices."
                f"peak_tflops: {has}); bf16 on CPUs needs AVX512-BF16 (Cooper Lake, Zen 4) or AMX (Sapphire "
                "Rapids and later): use --precision fp32, or add the CPU's bf16 peak to the profile")
    return (f"--precision {precision}: machine {machine.name!r} has CPUs ({devices.model}), and the trainer runs "
            f"{precision} on GPUs only; use --precision fp32" + (", or bf16 (its peak is in the profile)"
                                                               if "bf16" in devices.peak_tflops else ""))


def compute_settings(machine: MachineProfile, precision: str, mode: str = "eager") -> RooflineSettings:
    """The roofline model's device rates for ``machine`` at ``precision`` (a precision the device has), in
    compute ``mode`` ("eager", or "compiled": fused element-wise passes, fewer kernels, replayed launches).

    Fields the profile leaves out take a documented default, each named in ``notes`` (one line): the memory
    bandwidth (fp32 peak / the kind's FLOP per byte), a GPU's SM count, the memory latency.
    """
    from analysis.devices import compiled, efficiency

    devices = machine.node.devices
    constants = efficiency(devices.kind)
    fused = compiled(devices.kind) if mode == "compiled" else None
    where = f"machine {machine.name!r}: node.devices"
    notes: list[str] = []
    bandwidth = devices.memory_bandwidth_gbytes_per_s
    if bandwidth is None:
        bandwidth = devices.peak_tflops["fp32"] * 1e3 / constants.default_flop_per_byte
        notes.append(f"{where}.memory_bandwidth_gbytes_per_s is not set: the compute model takes {bandwidth:.4g} "
                     f"GB/s (fp32 peak / {constants.default_flop_per_byte:g} FLOP per byte); set it from the "
                     "datasheet (analysis/data/devices.yaml lists common devices)")
    units = devices.compute_units
    if units is None:
        if devices.kind == "cpu":
            units = max(1, round(machine.node.cores / devices.count))     # a CPU device's cores
        else:
            units = 108
            notes.append(f"{where}.compute_units (SMs per GPU) is not set: the compute model takes {units}")
    latency_ns = devices.memory_latency_ns or constants.memory_latency_ns
    matrix = constants.matrix_efficiency.get(precision, constants.matrix_efficiency.get("fp32", 0.5))
    rates = DeviceRates(
        matrix_flops_per_s=devices.peak_tflops[precision] * 1e12 * matrix,
        channels_half=constants.channels_half, grouped_efficiency=constants.grouped_conv_efficiency,
        memory_bytes_per_s=memory_rate(bandwidth * 1e9, constants.memory_efficiency, units,
                                       constants.bytes_in_flight_per_unit, latency_ns * 1e-9),
        library_memory_bytes_per_s=bandwidth * 1e9 * constants.memory_efficiency,
        activation_bytes=2.0 if precision in HALF_WIDTH else 4.0, kernel_s=constants.kernel_us * 1e-6,
        memory_pass_share=fused.memory_pass_share if fused else 1.0, kernel_share=fused.kernel_share if fused else 1.0)
    compute = machine.compute
    default_host_us = fused.host_us_per_op if fused else constants.host_us_per_op
    host_us = default_host_us if compute.host_us_per_op is None else compute.host_us_per_op
    if compute.half_efficiency_gflop is not None:
        half_flops: float | None = compute.half_efficiency_gflop * 1e9
    elif compute.half_efficiency_batch is None and constants.half_efficiency_gflop_per_unit is not None:
        half_flops = constants.half_efficiency_gflop_per_unit * 1e9 * units
    else:
        half_flops = None
    half_batch = compute.half_efficiency_batch or 0.0
    return RooflineSettings(rates=rates, host_s_per_op=host_us * 1e-6, host_overlapped=constants.host_overlapped,
                            half_batch=half_batch, half_flops=half_flops, notes=tuple(notes))


def profile_notes(machine: MachineProfile, precision: str = "fp32") -> tuple[str, ...]:
    """The one-line notes of what ``machine`` leaves to defaults for the compute model (empty when complete)."""
    if machine.compute.model != "roofline":
        return ()
    devices = machine.node.devices
    return compute_settings(machine, precision if precision in devices.peak_tflops else "fp32").notes


def mixed_precision_scale_note(machine: MachineProfile, precision: str, max_nodes: int) -> str | None:
    """A note when a GPU prediction in mixed precision spans nodes on a profile whose links no run calibrated.

    On the public validation set most multi-node points in mixed precision ran slower than predicted, also with
    each published table predicted from the constants fitted on the others (analysis/README.md, "Validation at
    scale"; tests/test_model_validation.py keeps this sentence true): part of what mixed precision adds from one
    node to two is not in the model, so a plan should not rest on it alone.
    """
    if (machine.node.devices.kind != "gpu" or precision not in HALF_WIDTH or max_nodes <= 1
            or links_calibrated(machine)):
        return None
    return (f"{precision} across nodes: on the public validation set most multi-node mixed-precision points ran "
            "slower than predicted (`larscale validate --cross-validate`; analysis/README.md) - read this time as "
            "optimistic and calibrate from a 2-node run of your own (`larscale report`)")
