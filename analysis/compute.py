"""Seconds of computation per training step on one rank: from FLOPs and an efficiency, or from measurements.

FLOP model. A rank drives ``d = devices_per_node / ranks_per_node`` devices of peak ``P`` FLOP/s. At a
per-rank batch ``b`` it sustains a fraction of peak that falls at small batches, where there is too little
parallel work per step to keep the cores (or SMs) busy and fixed per-layer costs dominate:

    efficiency(b) = s · b / (b + h)            s = sustained_fraction, h = half_efficiency_batch

so at ``b = h`` the rank runs at half its large-batch rate. A profile may give that point as work instead
(``half_efficiency_gflop`` W per device): ``h = W·d/F`` images, the same work for every network. The step's
compute time is then

    t(b) = F · b / (d·P·efficiency(b)) = F·(b + h) / (d·P·s)       F = FLOPs per image (forward + backward)

— *linear in b*: ``t = c₀ + c₁·b`` with ``c₁ = F/(d·P·s)`` and ``c₀ = h·c₁``. A least-squares line through
measured (batch, step time) points gives ``s`` and ``h`` directly. Forward and backward take ``F_f/F`` and
``F_b/F`` of it, plus ``step_overhead_s`` per step (optimizer and framework).

Measured model. When the profile has ``measured_images_per_s[model]`` (one rank's training throughput vs
its batch, including the optimizer: step_overhead_s is not added again), the step time ``b / ips(b)`` is
interpolated *linearly in b* between measured batches — the same linear form as above — and continued
beyond the measured range along the nearest segment; from a single measurement it follows ``(b + h)`` with
the profile's h. The result is split into forward and backward by FLOPs. Measurements are keyed by
:func:`measured_key`: the model name at its native input size, ``"<model>@<size>"`` at another size (a
64-pixel ResNet-50 does far less work per image than a 224-pixel one, so neither may stand in for the other).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.params import PerfParams
from analysis.workload import Workload


@dataclass(frozen=True)
class ComputeTimes:
    forward_s: np.ndarray
    backward_s: np.ndarray
    overhead_s: np.ndarray

    @property
    def total_s(self) -> np.ndarray:
        return self.forward_s + self.backward_s + self.overhead_s


def efficiency(batch_per_rank, sustained_fraction: float, half_efficiency_batch: float) -> np.ndarray:
    """Fraction of peak sustained at this per-rank batch: ``s·b/(b+h)``."""
    b = np.asarray(batch_per_rank, dtype=float)
    return sustained_fraction * b / (b + half_efficiency_batch)


def measured_step_seconds(points: dict[int, float], batch_per_rank, half_efficiency_batch: float) -> np.ndarray:
    """Step seconds at ``batch_per_rank`` from measured {batch: images/s} (see the module docstring)."""
    if not points:
        raise ValueError("no measured throughput points")
    batches = np.array(sorted(points), dtype=float)
    seconds = np.array([b / points[int(b)] for b in batches])
    b = np.asarray(batch_per_rank, dtype=float)
    if len(batches) == 1:
        return seconds[0] * (b + half_efficiency_batch) / (batches[0] + half_efficiency_batch)
    slopes = np.diff(seconds) / np.diff(batches)
    # Index of the segment to use: interior points their own segment, outside points the end segments.
    segment = np.clip(np.searchsorted(batches, b, side="right") - 1, 0, len(batches) - 2)
    return seconds[segment] + slopes[segment] * (b - batches[segment])


def measured_key(model: str, image_size: int | None = None) -> str:
    """Key of ``measured_images_per_s``: ``model`` at its native input size (or None), else ``model@size``."""
    if image_size is None:
        return model
    # Architecture metadata only: no torch or tensorflow behind it.
    from models import input_size

    return model if int(image_size) == int(input_size(model)) else f"{model}@{int(image_size)}"


def compute_times(workload: Workload, params: PerfParams, batch_per_rank, ranks_per_node,
                  image_size: int | None = None) -> ComputeTimes:
    """Forward, backward and fixed per-step seconds of one rank (vectorised over the arrays).

    ``image_size`` is the input size ``workload`` was built for (None: native); it selects the measured
    throughput (:func:`measured_key`), never the FLOP model, which reads the workload's own FLOPs.
    """
    b = np.asarray(batch_per_rank, dtype=float)
    forward_share = workload.forward_flops / workload.flops_per_image
    measured = params.measured_images_per_s.get(measured_key(workload.model, image_size))
    devices_per_rank = params.devices_per_node / np.asarray(ranks_per_node, dtype=float)
    half = params.half_batch(workload.flops_per_image, devices_per_rank)
    if measured:
        step = measured_step_seconds(dict(measured), b, half)
        overhead = np.zeros_like(step)
    else:
        rate = params.peak_flops_per_device * devices_per_rank * params.sustained_fraction
        step = workload.flops_per_image * (b + half) / rate
        overhead = np.full_like(step, params.step_overhead_s)
    return ComputeTimes(forward_s=step * forward_share, backward_s=step * (1.0 - forward_share),
                        overhead_s=overhead)
