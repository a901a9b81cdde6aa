"""The compute fit of `larscale calibrate`: measured images/s and the compute model's efficiency from runs.

Per run (:func:`analysis.runs.read_run`), over the measured steps (warm-up excluded as the summary says),
the median of the per-step slowest-rank non-communication time ``step_s − allreduce_s``. That gives
``measured_images_per_s[model][b] = b / t`` (the measured model of :mod:`analysis.compute`; repeated runs of
one point: the mean of their t), and, over all runs at once, the FLOP model ``t = F·(b + h)/(d·P·s)`` (F
FLOPs per image at the run's image size, d devices the rank drives, P peak): ``t·d·P/F = b/s + h/s`` is a line in b,
so a least-squares line gives the sustained fraction s and the half-efficiency batch h shared by all models.

Measured throughput at a non-native image size (a 64-pixel ResNet-50 run) is stored under the key
``"<model>@<size>"`` so that a prediction at the native size never reads it (:func:`workload_key`,
:func:`analysis.compute.measured_key`; a prediction with ``image_size`` reads its own size's entry).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analysis.fitting import CalibrationError, line_through, plain
from analysis.runs import RunMeasurement, workload_key


@dataclass(frozen=True)
class RooflinePoint:
    """The roofline model's seconds for one run's step, unfitted: ``device_s`` at efficiency_scale 1 without
    small-batch starvation, ``host_s`` of host time that adds to it (CPU), ``batch_per_device`` x."""

    device_s: float
    host_s: float
    batch_per_device: float


@dataclass(frozen=True)
class ComputeFit:
    sustained_fraction: float
    half_efficiency_batch: float
    measured_images_per_s: dict[str, dict[int, float]]
    runs: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    # The roofline model's fit (when the base profile uses it): measured ÷ modelled rate, and the per-device
    # batch at which small batches halve the rate.
    efficiency_scale: float | None = None
    roofline_half_batch: float | None = None
    partial_node_speedup: float | None = None     # measured from runs alone beside runs side by side
    precision: str | None = None                  # the runs' (one precision per fit), when they recorded it

    def rms_relative(self) -> float:
        values = [r["relative"] for r in self.runs]
        return math.sqrt(statistics.fmean(v * v for v in values)) if values else math.nan

    def summary(self) -> dict[str, Any]:
        out = {"sustained_fraction": self.sustained_fraction,
               "half_efficiency_batch": self.half_efficiency_batch,
               "rms_relative_residual": self.rms_relative(),
               "max_relative_residual": max((abs(r["relative"]) for r in self.runs), default=math.nan),
               "runs": self.runs, "notes": list(self.notes)}
        if self.efficiency_scale is not None:
            out["roofline"] = {"efficiency_scale": self.efficiency_scale,
                               "half_efficiency_batch": self.roofline_half_batch}
        if self.partial_node_speedup is not None:
            out["partial_node_speedup"] = self.partial_node_speedup
        return plain(out)


def fit_compute(runs: Sequence[RunMeasurement], peak_flops_per_device: float, cores_per_device: float = 1.0,
                default_half_efficiency_batch: float = 4.0, notes: Sequence[str] = (),
                roofline: Callable[[RunMeasurement], RooflinePoint] | None = None,
                default_roofline_half_batch: float = 0.0) -> ComputeFit:
    """Measured images/s per (model, batch) and the FLOP model's s and h fitted to all runs at once.

    ``cores_per_device`` turns a run's threads into the devices it drove (CPU profiles count cores or
    sockets as devices); a run without a thread count drives one device. ``notes`` (e.g. from
    :func:`pace_side_by_side`) head the fit's notes.

    With ``roofline`` (the base profile's model, one :class:`RooflinePoint` per run) the roofline model is
    fitted too: ``t − H = R·(1 + h/x)/k`` is a line in x, ``(t − H)·x/R = x/k + h/k``, giving the
    efficiency scale k and the half-efficiency batch h per device.
    """
    from analysis.workload import load_workload

    if not runs:
        raise CalibrationError("no training runs to fit compute from")
    measured: dict[str, dict[int, list[float]]] = {}
    points = []
    for run in runs:
        key = workload_key(run.model, run.image_size)
        measured.setdefault(key, {}).setdefault(run.batch_per_rank, []).append(run.images_per_s)
        workload = load_workload(run.model, run.image_size)
        devices = max(1.0, (run.threads_per_rank or cores_per_device) / cores_per_device)
        # y = t·d·P/F = b/s + h/s : a line in b.
        y = run.busy_s * devices * peak_flops_per_device / workload.flops_per_image
        points.append((run, key, workload.flops_per_image, devices, y))
    notes = list(notes)
    b = np.array([float(p[0].batch_per_rank) for p in points])
    y = np.array([p[4] for p in points])
    sustained, half = line_through(b, y, default_half_efficiency_batch, "FLOP model", notes)
    scale = roofline_half = None
    modelled: dict[int, RooflinePoint] = {}
    if roofline is not None:
        modelled = {id(run): roofline(run) for run in runs}
        x = np.array([modelled[id(p[0])].batch_per_device for p in points])
        busy = np.array([p[0].busy_s - modelled[id(p[0])].host_s for p in points])
        if np.any(busy <= 0):
            raise CalibrationError("the roofline model's host time alone exceeds a measured step")
        yr = busy * x / np.array([modelled[id(p[0])].device_s for p in points])
        scale, roofline_half = line_through(x, yr, default_roofline_half_batch, "roofline", notes)
        roofline_half = max(roofline_half, 0.0)
    records = []
    for run, key, flops, devices, _ in points:
        model_s = flops * (run.batch_per_rank + half) / (devices * peak_flops_per_device * sustained)
        record = {"run": run.path, "model": run.model, "key": key, "image_size": run.image_size,
                  "batch_per_rank": run.batch_per_rank, "threads_per_rank": run.threads_per_rank,
                  "steps_measured": run.steps_measured, "busy_s": run.busy_s, "step_s": run.step_s,
                  "compute_s": run.compute_s, "optimizer_s": run.optimizer_s, "data_s": run.data_s,
                  "images_per_s": run.images_per_s, "flops_per_image": flops, "flop_model_s": model_s,
                  "relative": model_s / run.busy_s - 1.0}
        if scale is not None:
            point = modelled[id(run)]
            roofline_s = point.device_s * (1 + roofline_half / point.batch_per_device) / scale + point.host_s
            record.update(roofline_model_s=roofline_s, roofline_relative=roofline_s / run.busy_s - 1.0,
                          relative=roofline_s / run.busy_s - 1.0)
        records.append(record)
    if not 0 < sustained <= 1:
        notes.append(f"fitted sustained fraction {sustained:.3g} is outside (0, 1]: the profile's peak is too low; "
                     "clipped to 1")
        sustained = min(max(sustained, 1e-6), 1.0)
    # Repeated runs of one point: their step times are averaged (a time-to-train is a sum of steps), i.e. the
    # harmonic mean of their rates. A median picked one run of three when the machine drifted between them.
    table = {key: {batch: statistics.harmonic_mean(values) for batch, values in sorted(by_batch.items())}
             for key, by_batch in measured.items()}
    return ComputeFit(sustained_fraction=float(sustained), half_efficiency_batch=float(max(half, 0.0)),
                      measured_images_per_s=table, runs=records, notes=notes,
                      efficiency_scale=None if scale is None else float(scale),
                      roofline_half_batch=None if roofline_half is None else float(roofline_half))


def roofline_point_of(base, cores_per_device: float = 1.0) -> Callable[[RunMeasurement], RooflinePoint]:
    """The unfitted roofline model of ``base`` (a MachineProfile) for runs: what :func:`fit_compute` fits."""
    from analysis.params import PerfParams
    from analysis.roofline import roofline_curves
    from analysis.workload import load_workload

    params = PerfParams.from_machine(base).replace(efficiency_scale=1.0)

    def point(run: RunMeasurement) -> RooflinePoint:
        curves = roofline_curves(load_workload(run.model, run.image_size).layers, params.rates)
        devices = max(1.0, (run.threads_per_rank or cores_per_device) / cores_per_device)
        x = run.batch_per_rank / devices
        device_s = float(curves.forward(x) + curves.backward(x)) + curves.fixed_s
        host_s = 0.0 if params.host_overlapped else curves.host_ops * params.host_s_per_op
        return RooflinePoint(device_s=device_s, host_s=host_s, batch_per_device=x)
    return point
