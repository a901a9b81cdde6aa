"""Seconds of computation per training step on one rank: from the hardware, from FLOPs, or from measurements.

Three models, in order of precedence:

1. measured: the profile's ``measured_images_per_s`` for this workload (calibration or the user), below;
2. roofline (``compute.model: roofline``, the default): layer by layer from the device's peaks, memory
   bandwidth and the catalog's efficiency constants (:mod:`analysis.roofline`). A rank driving d devices at
   per-rank batch b runs each device at x = b/d images; the device's forward, backward and per-step times
   are divided by ``efficiency_scale`` (1 unless calibrated) and the forward and backward parts multiplied
   by ``1 + h/x`` (h: images per device at which small batches halve efficiency — CPU core starvation; 0
   for GPUs). The host dispatches ``host_ops`` framework operations a step at ``host_s_per_op`` each: on a
   GPU it runs ahead of the device, so a step takes at least that long (below ~64 images a ResNet-50 step on
   an H200 costs the same 17-22 ms whatever the batch); on a CPU the same cores do it, so it adds;
3. sustained (``compute.model: sustained``): the FLOP model below.

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
from analysis.roofline import roofline_curves
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
    throughput (:func:`measured_key`), never the FLOP model, which reads the workload's own FLOPs. With
    fewer ranks per node than the profile's, every model's time is divided by ``partial_node_speedup``.
    """
    times = _compute_times(workload, params, batch_per_rank, ranks_per_node, image_size)
    if params.partial_node_speedup == 1.0:
        return times
    # A node with fewer ranks than the profile's (e.g. 1 of 2 cores) runs each device faster than the fully
    # loaded node the measurements and constants describe.
    factor = np.where(np.asarray(ranks_per_node) < params.default_ranks_per_node, 1.0 / params.partial_node_speedup,
                      1.0)
    return ComputeTimes(forward_s=times.forward_s * factor, backward_s=times.backward_s * factor,
                        overhead_s=times.overhead_s * factor)


def _compute_times(workload: Workload, params: PerfParams, batch_per_rank, ranks_per_node,
                   image_size: int | None) -> ComputeTimes:
    b = np.asarray(batch_per_rank, dtype=float)
    forward_share = workload.forward_flops / workload.flops_per_image
    measured = params.measured_images_per_s.get(measured_key(workload.model, image_size))
    devices_per_rank = params.devices_per_node / np.asarray(ranks_per_node, dtype=float)
    half = params.half_batch(workload.flops_per_image, devices_per_rank)
    if measured:
        step = measured_step_seconds(dict(measured), b, half)
        overhead = np.zeros_like(step)
    elif params.compute_model == "roofline":
        return roofline_times(workload, params, b, devices_per_rank)
    else:
        rate = params.peak_flops_per_device * devices_per_rank * params.sustained_fraction
        step = workload.flops_per_image * (b + half) / rate
        overhead = np.full_like(step, params.step_overhead_s)
    return ComputeTimes(forward_s=step * forward_share, backward_s=step * (1.0 - forward_share),
                        overhead_s=overhead)


def roofline_times(workload: Workload, params: PerfParams, batch_per_rank, devices_per_rank) -> ComputeTimes:
    """The roofline model's forward, backward and per-step seconds of one rank (see the module docstring)."""
    if not workload.layers:
        raise ValueError(f"workload {workload.model!r} has no per-layer costs for the roofline compute model")
    b, d = np.broadcast_arrays(np.asarray(batch_per_rank, dtype=float), np.asarray(devices_per_rank, dtype=float))
    x = b / d
    curves = roofline_curves(workload.layers, params.rates)
    per_device_half = params.half_batch(workload.flops_per_image, 1.0)
    starvation = 1.0 + per_device_half / x
    scale = 1.0 / params.efficiency_scale
    forward = curves.forward(x) * starvation * scale
    backward = curves.backward(x) * starvation * scale
    fixed = np.full_like(x, curves.fixed_s * scale)
    host = curves.host_ops * params.host_s_per_op
    if params.host_overlapped:
        # The host runs ahead of the device: a step lasts the longer of the two, the device waiting for
        # launches throughout (every part stretched alike).
        stretch = np.maximum(1.0, host / (forward + backward + fixed))
        forward, backward, fixed = forward * stretch, backward * stretch, fixed * stretch
    else:
        fixed = fixed + host
    return ComputeTimes(forward_s=forward, backward_s=backward, overhead_s=fixed + params.step_overhead_s)
