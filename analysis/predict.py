"""Predicted iteration time, time-to-train and throughput of data-parallel training, vectorised.

For ``nodes`` nodes with ``ranks_per_node`` ranks each (p ranks), global batch ``B`` (``b = B/p`` per rank):

    compute_s       = forward + backward + step overhead        (analysis.compute)
    comm_exposed_s  = allreduce time not hidden behind the backward pass (analysis.overlap, analysis.comm):
                      the schedule's wait after the backward pass, plus the part of all communication that
                      needs the compute cores and so cannot hide (the profile's overlap fractions); with
                      ``network.overlap: none`` every gradient is ready only when the backward pass ends;
                      plus the backward pass's slowdown beside the collectives it hides (interference)
    data_s          = b·ranks_per_node / (node's decode rate)   (0 when the profile gives no rate)
    jitter_s        = σ · (E[max of p standard normals] − E[max of k])  (the wait for the slowest rank),
                      σ = √((cv · compute_s)² + (per-image spread · b)²)
    iteration_s     = max(compute_s + comm_exposed_s + jitter_s, data_s)   if data is prefetched, else the sum
    epoch_s         = iteration_s · N / B                       (N images per epoch, ImageNet-1k by default)
    time_to_train_s = ⌈E·N/B⌉ · iteration_s                     (E epochs; whole iterations)
    images_per_s    = B / iteration_s
    scaling_efficiency = images_per_s / (p · one rank's images/s at the same b, without communication)

The stable keys of a prediction (``KEYS``) are documented in ``analysis/README.md``. ``predict`` evaluates
whole arrays of configurations at once (a grid of a million points in well under a second);
``predict_point`` is the scalar convenience wrapper used by ``jobs/`` to size walltimes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from analysis.comm import allreduce_affine
from analysis.compute import compute_times, measured_key
from analysis.overlap import simulate
from analysis.params import PerfParams
from analysis.workload import IMAGENET_TRAIN_IMAGES, Workload, load_workload
from larscale.machine import MachineProfile, load_machine

GRADIENT_DTYPES = ("fp32", "fp16", "bf16")
# Prediction intervals span ± this many standard deviations of the log iteration time (a 90 % band).
INTERVAL_Z = 1.645
KEYS = ("iteration_s", "compute_s", "comm_exposed_s", "epoch_s", "time_to_train_s", "images_per_s",
        "scaling_efficiency")


@dataclass(frozen=True)
class Prediction:
    """Arrays of one shape (the broadcast of the inputs), one entry per configuration."""

    model: str
    machine: str
    nodes: np.ndarray
    ranks_per_node: np.ndarray
    ranks: np.ndarray
    global_batch: np.ndarray
    batch_per_rank: np.ndarray
    epochs: np.ndarray
    iterations: np.ndarray
    forward_s: np.ndarray
    backward_s: np.ndarray
    overhead_s: np.ndarray
    compute_s: np.ndarray
    data_s: np.ndarray
    data_exposed_s: np.ndarray
    comm_total_s: np.ndarray
    comm_exposed_s: np.ndarray
    jitter_s: np.ndarray          # the wait for the slowest rank (expected maximum of p step times − mean)
    buckets: np.ndarray
    iteration_s: np.ndarray
    epoch_s: np.ndarray
    time_to_train_s: np.ndarray
    images_per_s: np.ndarray
    scaling_efficiency: np.ndarray
    node_hours: np.ndarray
    # The prediction interval (INTERVAL: a 90 % band from the parameters' documented spread).
    iteration_s_low: np.ndarray
    iteration_s_high: np.ndarray
    images_per_s_low: np.ndarray
    images_per_s_high: np.ndarray
    time_to_train_s_low: np.ndarray
    time_to_train_s_high: np.ndarray
    node_hours_low: np.ndarray
    node_hours_high: np.ndarray

    @property
    def size(self) -> int:
        return int(self.iteration_s.size)

    def record(self, index: int = 0) -> dict[str, Any]:
        """One configuration as a plain dict: the stable KEYS first, then inputs and the breakdown."""
        out: dict[str, Any] = {"model": self.model, "machine": self.machine}
        array_fields = [f.name for f in fields(self) if f.name not in ("model", "machine")]
        ordered = list(KEYS) + [n for n in array_fields if n not in KEYS]
        for name in ordered:
            value = np.asarray(getattr(self, name)).reshape(-1)[index]
            out[name] = int(value) if name in _INTEGER_FIELDS else float(value)
        # The exposed part may include the wait for Horovod's next cycle, which no collective hides.
        out["comm_hidden_s"] = max(0.0, out["comm_total_s"] - out["comm_exposed_s"])
        return out

    def records(self) -> list[dict[str, Any]]:
        return [self.record(i) for i in range(self.size)]


_INTEGER_FIELDS = {"nodes", "ranks_per_node", "ranks", "global_batch", "batch_per_rank", "iterations", "buckets"}


def resolve_machine(machine: str | Path | MachineProfile) -> MachineProfile:
    return machine if isinstance(machine, MachineProfile) else load_machine(machine)


def resolve_workload(model: str | Workload, image_size: int | None = None, num_classes: int = 1000) -> Workload:
    return model if isinstance(model, Workload) else load_workload(model, image_size, num_classes)


def _as_int_array(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            bad = array.reshape(-1)[~(np.isfinite(array.reshape(-1)) & (array.reshape(-1) == np.round(
                array.reshape(-1))))][0]
            raise ValueError(f"{name} must be a whole number, got {bad!r}")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if np.any(array < 1):
        raise ValueError(f"{name} must be >= 1, got {int(array.reshape(-1)[np.argmax(array.reshape(-1) < 1)])}")
    return array.astype(np.int64)


def expected_max_normal(count) -> np.ndarray:
    """E[max of n independent standard normals] (Blom's approximation ``Φ⁻¹((n − 0.375)/(n + 0.25))``; 0 for
    n = 1), evaluated once per distinct n."""
    n = np.asarray(count)
    distinct, inverse = np.unique(n, return_inverse=True)
    inv_cdf = NormalDist().inv_cdf
    values = np.array([0.0 if k <= 1 else inv_cdf((k - 0.375) / (k + 0.25)) for k in distinct.tolist()])
    return values[inverse].reshape(n.shape)


def validate(params: PerfParams, nodes: np.ndarray, ranks_per_node: np.ndarray, global_batch: np.ndarray,
             epochs: np.ndarray) -> None:
    """Clear errors for configurations the machine or the batch cannot hold (first culprit named)."""
    if params.max_nodes is not None and np.any(nodes > params.max_nodes):
        worst = int(nodes.max())
        raise ValueError(f"nodes={worst} is beyond machine {params.machine!r} (max_nodes {params.max_nodes})")
    ranks = nodes * ranks_per_node
    bad = global_batch % ranks != 0
    if np.any(bad):
        i = int(np.argmax(bad.reshape(-1)))
        b, p = int(global_batch.reshape(-1)[i]), int(ranks.reshape(-1)[i])
        raise ValueError(f"global batch {b} is not divisible by {p} ranks "
                         f"({int(nodes.reshape(-1)[i])} nodes x {int(ranks_per_node.reshape(-1)[i])} per node)")
    if np.any(~np.isfinite(epochs)) or np.any(epochs <= 0):
        raise ValueError(f"epochs must be > 0, got {float(epochs.reshape(-1)[np.argmax(~(epochs > 0))])}")


def predict_from(workload: Workload, params: PerfParams, nodes, global_batch, epochs=90.0,
                 ranks_per_node=None, dataset_size: int = IMAGENET_TRAIN_IMAGES,
                 check: bool = True, image_size: int | None = None) -> Prediction:
    """The model as a pure function of its parameters and of arrays of configurations (see module doc).

    ``image_size``: the input size ``workload`` was built for (None: native), which selects the measured
    throughput of that size (:func:`analysis.compute.measured_key`).
    """
    nodes_a = _as_int_array("nodes", nodes)
    rpn_a = _as_int_array("ranks_per_node", params.default_ranks_per_node if ranks_per_node is None
                          else ranks_per_node)
    batch_a = _as_int_array("global_batch", global_batch)
    epochs_a = np.asarray(epochs, dtype=float)
    if dataset_size < 1:
        raise ValueError(f"dataset_size must be >= 1, got {dataset_size!r}")
    # The allreduce cost depends on the placement only: evaluate it before broadcasting (a grid of nodes x
    # batches then costs one evaluation per node count, not per point).
    latency, per_byte = allreduce_affine(params.algorithm, nodes_a, rpn_a, params.link)
    serial_latency, serial_per_byte = allreduce_affine(params.algorithm, nodes_a, rpn_a, params.serial_link())
    # The framework's cost per bucket (where there is a collective) and 16-bit gradients on the wire.
    latency = latency + np.where(nodes_a * rpn_a > 1, params.bucket_overhead_s, 0.0)
    per_byte, serial_per_byte = per_byte * params.gradient_scale, serial_per_byte * params.gradient_scale
    # The compute-core part of each cost (never above the cost itself, rounding included).
    serial_latency, serial_per_byte = np.minimum(serial_latency, latency), np.minimum(serial_per_byte, per_byte)
    # Per placement too: the wait for the slowest rank in units of the compute time (cv times E[max of p step
    # times] − mean in standard deviations, beyond what the compute measurement already waited for), and the
    # interval's factor (below).
    included = float(expected_max_normal(params.jitter_included_ranks))
    beyond = np.maximum(expected_max_normal(nodes_a * rpn_a) - included, 0.0)
    slowest = params.jitter_cv * beyond
    widen = interval_factor(workload, params, nodes_a * rpn_a, image_size)
    (nodes_a, rpn_a, batch_a, epochs_a, latency, per_byte, serial_latency, serial_per_byte, slowest, beyond,
     widen) = np.broadcast_arrays(nodes_a, rpn_a, batch_a, epochs_a, latency, per_byte, serial_latency,
                                  serial_per_byte, slowest, beyond, widen)
    if check:
        validate(params, nodes_a, rpn_a, batch_a, epochs_a)
    ranks = nodes_a * rpn_a
    b = batch_a / ranks
    times = compute_times(workload, params, b, rpn_a, image_size=image_size)
    compute_s = times.total_s
    # Fusion copies only where there is a collective (one rank reduces nothing).
    copy = np.where(ranks > 1, params.copy_s_per_byte * params.gradient_scale, 0.0)
    # Without layerwise overlap (a backward compiled as one graph hands every gradient over at its end),
    # every gradient event is ready when the backward pass ends: the same schedule, nothing left to hide.
    ready = (workload.event_ready_fraction if params.overlap == "layerwise"
             else np.ones_like(workload.event_ready_fraction))
    overlap = simulate(ready, workload.event_bytes, times.backward_s, latency, per_byte,
                       params.fusion_bytes, params.cycle_s, serial_latency, serial_per_byte,
                       copy, copy * (1.0 - params.overlap_reduce), interference=params.interference)
    comm_exposed = overlap.comm_exposed_s
    # A synchronous step waits for the slowest of p ranks.
    busy = compute_s + comm_exposed
    if params.jitter_s_per_image > 0:
        # Two independent spreads, in quadrature: a share of the compute and the host's per-image work.
        jitter = beyond * np.hypot(params.jitter_cv * compute_s, params.jitter_s_per_image * b)
        busy += jitter
    elif params.jitter_cv > 0:
        jitter = compute_s * slowest
        busy += jitter
    else:
        jitter = np.zeros_like(compute_s)
    data_s = b * rpn_a / params.data_images_per_s_per_node
    single_data_s = b / params.data_images_per_s_per_node
    if params.data_overlapped:
        iteration = np.maximum(busy, data_s)
        single = np.maximum(compute_s, single_data_s)
    else:
        iteration = busy + data_s
        single = compute_s + single_data_s
    data_exposed = iteration - busy
    per_epoch = dataset_size / batch_a
    iterations = np.ceil(epochs_a * per_epoch - 1e-9)
    time_to_train = iterations * iteration
    images_per_s = batch_a / iteration
    node_hours = nodes_a * time_to_train / 3600.0
    return Prediction(
        model=workload.model, machine=params.machine, nodes=nodes_a, ranks_per_node=rpn_a, ranks=ranks,
        global_batch=batch_a, batch_per_rank=b, epochs=epochs_a, iterations=iterations,
        forward_s=times.forward_s, backward_s=times.backward_s, overhead_s=times.overhead_s,
        compute_s=compute_s, data_s=data_s, data_exposed_s=data_exposed, comm_total_s=overlap.comm_total_s,
        comm_exposed_s=comm_exposed, jitter_s=jitter, buckets=overlap.buckets, iteration_s=iteration,
        epoch_s=iteration * per_epoch, time_to_train_s=time_to_train, images_per_s=images_per_s,
        scaling_efficiency=single / iteration, node_hours=node_hours,
        iteration_s_low=iteration / widen, iteration_s_high=iteration * widen, images_per_s_low=images_per_s / widen,
        images_per_s_high=images_per_s * widen, time_to_train_s_low=time_to_train / widen,
        time_to_train_s_high=time_to_train * widen, node_hours_low=node_hours / widen,
        node_hours_high=node_hours * widen)


def interval_factor(workload: Workload, params: PerfParams, ranks, image_size: int | None = None) -> np.ndarray:
    """``exp(z·σ)`` per configuration: the prediction interval is the iteration time divided and multiplied by it.

    σ combines in quadrature the compute's spread (measured images/s or the roofline) and, with more than one
    rank, the spread of what scale adds (communication, the slowest rank, interference), on the log of the
    iteration time; z = INTERVAL_Z (a 90 % band).
    """
    measured = bool(params.measured_images_per_s.get(measured_key(workload.model, image_size)))
    compute_sigma = params.compute_sigma_measured if measured else params.compute_sigma_roofline
    one = math.exp(INTERVAL_Z * compute_sigma)
    many = math.exp(INTERVAL_Z * math.hypot(compute_sigma, params.scale_sigma))
    return np.where(np.asarray(ranks) > 1, many, one)


def predict(model: str | Workload, machine: str | Path | MachineProfile, nodes, global_batch, epochs=90.0,
            ranks_per_node=None, dataset_size: int = IMAGENET_TRAIN_IMAGES, precision: str = "fp32",
            params: PerfParams | None = None, image_size: int | None = None, num_classes: int = 1000,
            overlap: str | None = None, compute_mode: str | None = None,
            gradient_dtype: str | None = None) -> Prediction:
    """Vectorised prediction: ``nodes``, ``global_batch``, ``epochs`` and ``ranks_per_node`` broadcast.

    ``machine`` is a bundled profile name, a path to a profile YAML or a MachineProfile; ``params``
    (e.g. fitted by calibration) replaces the parameters the profile would give. Bad input (unknown model
    or machine, nodes beyond the machine, a batch not divisible by the ranks) raises ValueError.
    ``image_size``/``num_classes`` other than the native ones recompute the layer table (small test runs), and
    ``image_size`` selects the profile's measured images/s for that size (key ``model@size``); a Workload
    given as ``model`` is used as it is, ``image_size`` then says which size it was built for. ``overlap``
    ("layerwise" or "none") replaces the profile's ``network.overlap``, ``compute_mode`` ("eager" or
    "compiled") its ``compute.mode``, ``gradient_dtype`` ("fp32", "fp16", "bf16") its
    ``network.collectives.gradient_dtype``.
    """
    workload = resolve_workload(model, image_size, num_classes)
    if params is None:
        params = PerfParams.from_machine(resolve_machine(machine), precision=precision, compute_mode=compute_mode)
    elif compute_mode is not None:
        raise ValueError("compute_mode selects the profile's parameters: give it or params, not both")
    if overlap is not None:
        params = params.replace(overlap=overlap)
    if gradient_dtype is not None:
        if gradient_dtype not in GRADIENT_DTYPES:
            raise ValueError(f"unknown gradient dtype {gradient_dtype!r}; known: {', '.join(GRADIENT_DTYPES)}")
        params = params.replace(gradient_scale=1.0 if gradient_dtype == "fp32" else 0.5)
    return predict_from(workload, params, nodes, global_batch, epochs, ranks_per_node, dataset_size,
                        image_size=image_size)


def predict_point(model: str, machine: str | Path | MachineProfile, nodes: int, global_batch: int,
                  epochs: float = 90.0, ranks_per_node: int | None = None,
                  dataset_size: int = IMAGENET_TRAIN_IMAGES, precision: str = "fp32", image_size: int | None = None,
                  num_classes: int = 1000, params: PerfParams | None = None,
                  overlap: str | None = None, compute_mode: str | None = None,
                  gradient_dtype: str | None = None) -> dict[str, Any]:
    """One configuration → a dict with the stable KEYS (seconds, images/s, efficiency) and the breakdown."""
    result = predict(model, machine, nodes, global_batch, epochs, ranks_per_node, dataset_size, precision,
                     params=params, image_size=image_size, num_classes=num_classes, overlap=overlap,
                     compute_mode=compute_mode, gradient_dtype=gradient_dtype)
    record = result.record(0)
    if not math.isfinite(record["iteration_s"]):
        raise ValueError(f"prediction for {model} on {record['machine']} is not finite")
    return record
