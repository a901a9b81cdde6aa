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
from larscale.machine import MachineProfile

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "fp8")


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

    def __post_init__(self) -> None:
        check_algorithm(self.algorithm)
        for name in ("fusion_bytes", "peak_flops_per_device", "sustained_fraction", "data_images_per_s_per_node"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PerfParams.{name} must be > 0, got {getattr(self, name)!r}")
        if self.half_efficiency_flops is not None and not self.half_efficiency_flops > 0:
            raise ValueError(f"PerfParams.half_efficiency_flops must be > 0, got {self.half_efficiency_flops!r}")
        for name in ("cycle_s", "half_efficiency_batch", "step_overhead_s", "copy_s_per_byte"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"PerfParams.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("overlap_intra", "overlap_inter", "overlap_reduce"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"PerfParams.{name} must be in [0, 1], got {getattr(self, name)!r}")

    @classmethod
    def from_machine(cls, machine: MachineProfile, precision: str = "fp32") -> PerfParams:
        devices = machine.node.devices
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
        if precision not in devices.peak_tflops:
            # No faster math for this precision on this device (e.g. bf16 on an older CPU): fp32 rate.
            precision = "fp32"
        net = machine.network
        compute = machine.compute
        return cls(
            link=LinkCost(alpha_intra_s=net.intra_node.alpha_s,
                          beta_intra_s_per_byte=net.intra_node.beta_s_per_byte,
                          alpha_inter_s=net.inter_node.alpha_s,
                          beta_inter_s_per_byte=net.inter_node.beta_s_per_byte,
                          gamma_s_per_byte=net.gamma_s_per_byte),
            algorithm=net.algorithm,
            fusion_bytes=net.fusion_buffer_mb * 2**20,
            cycle_s=net.cycle_time_ms * 1e-3,
            peak_flops_per_device=devices.peak_tflops[precision] * 1e12,
            devices_per_node=devices.count,
            sustained_fraction=compute.sustained_fraction_by_precision.get(precision, compute.sustained_fraction),
            half_efficiency_batch=compute.half_efficiency_batch,
            half_efficiency_flops=(None if compute.half_efficiency_gflop is None
                                   else compute.half_efficiency_gflop * 1e9),
            step_overhead_s=compute.step_overhead_s,
            data_images_per_s_per_node=compute.data_images_per_s or math.inf,
            data_overlapped=compute.data_overlapped,
            overlap_intra=net.intra_node.overlap_fraction,
            overlap_inter=net.inter_node.overlap_fraction,
            overlap_reduce=net.reduce_overlap_fraction,
            copy_s_per_byte=net.fusion_copy_s_per_byte,
            measured_images_per_s={k: dict(v) for k, v in compute.measured_images_per_s.items()},
            max_nodes=machine.limits.max_nodes,
            default_ranks_per_node=machine.default_ranks_per_node,
            machine=machine.name,
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
