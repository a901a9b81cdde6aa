"""The model written plainly, one configuration at a time: the reference the vectorised :mod:`analysis.predict`
is tested against (tests/test_model_plain.py) and timed beside (benchmarks/bench_predict.py).

Every step is a Python loop or scalar formula taken from the documentation of the model, not from the
vectorised code: the compute layer by layer (:func:`analysis.roofline.step_seconds_plain`), the allreduce cost
from its coefficients, the bucket schedule event by event on its two timelines, the wait for the slowest rank,
data loading, the epoch and the prediction interval.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

from analysis.comm import allreduce_terms
from analysis.compute import measured_key
from analysis.params import PerfParams
from analysis.predict import INTERVAL_Z
from analysis.roofline import host_ops, step_seconds_plain
from analysis.workload import IMAGENET_TRAIN_IMAGES, Workload


def expected_max(count: int) -> float:
    """Blom's approximation of E[max of ``count`` standard normals] (0 for one)."""
    return 0.0 if count <= 1 else NormalDist().inv_cdf((count - 0.375) / (count + 0.25))


def _measured_step(points: dict[int, float], batch: float, half: float) -> float:
    batches = sorted(points)
    seconds = [b / points[b] for b in batches]
    if len(batches) == 1:
        return seconds[0] * (batch + half) / (batches[0] + half)
    i = 0
    while i < len(batches) - 2 and batch >= batches[i + 1]:
        i += 1
    slope = (seconds[i + 1] - seconds[i]) / (batches[i + 1] - batches[i])
    return seconds[i] + slope * (batch - batches[i])


def compute_seconds(workload: Workload, params: PerfParams, batch: float, ranks_per_node: int,
                    image_size: int | None) -> tuple[float, float, float]:
    """(forward, backward, per-step) seconds of one rank."""
    devices = params.devices_per_node / ranks_per_node
    share = workload.forward_flops / workload.flops_per_image
    measured = params.measured_images_per_s.get(measured_key(workload.model, image_size))
    if measured:
        step = _measured_step(dict(measured), batch, params.half_batch(workload.flops_per_image, devices))
        forward, backward, fixed = step * share, step * (1 - share), 0.0
    elif params.compute_model == "roofline":
        x = batch / devices
        plain = step_seconds_plain(workload.layers, params.rates, x)
        stretch = (1 + params.half_batch(workload.flops_per_image, 1.0) / x) / params.efficiency_scale
        forward, backward = plain.forward_s * stretch, plain.backward_s * stretch
        fixed = plain.fixed_s / params.efficiency_scale
        host = host_ops(workload.layers) * params.host_s_per_op
        if params.host_overlapped:
            wait = max(1.0, host / (forward + backward + fixed))
            forward, backward, fixed = forward * wait, backward * wait, fixed * wait
        else:
            fixed += host
        fixed += params.step_overhead_s
    else:
        rate = params.peak_flops_per_device * devices * params.sustained_fraction
        step = workload.flops_per_image * (batch + params.half_batch(workload.flops_per_image, devices)) / rate
        forward, backward, fixed = step * share, step * (1 - share), params.step_overhead_s
    if ranks_per_node < params.default_ranks_per_node and params.partial_node_speedup != 1.0:
        forward, backward, fixed = (t / params.partial_node_speedup for t in (forward, backward, fixed))
    return forward, backward, fixed


def schedule(workload: Workload, ready: list[float], backward: float, full: tuple[float, float, float],
             serial: tuple[float, float, float], fusion: float, cycle: float, interference: float
             ) -> tuple[float, float, int]:
    """(total, exposed seconds, buckets) of the bucket schedule (analysis/overlap.py's rules, one event at a time).

    ``full`` and ``serial``: (latency, seconds per byte, seconds per byte copied once) of a collective and of its
    compute-core part. Buckets form on the full timeline; when they end is timed on the overlappable one.
    """
    sizes = [float(n) for n in workload.event_bytes]
    hidden = tuple(f - s for f, s in zip(full, serial, strict=True))
    half_cycle = cycle / 2
    copied = [n <= fusion for n in sizes]

    def cost(costs, k):
        return (costs[1] + 2 * costs[2] if copied[k] else costs[1]) * sizes[k]

    launch = [ready[0] * backward + half_cycle] * 2
    finish = [launch[t] + c[0] + cost(c, 0) for t, c in enumerate((full, hidden))]
    fill, buckets = sizes[0], 1
    for k in range(1, len(sizes)):
        at = ready[k] * backward
        opens = at > launch[0] or fill + sizes[k] > fusion
        if opens:
            fill = sizes[k]
            buckets += 1
            for t, c in enumerate((full, hidden)):
                launch[t] = max(at + half_cycle, finish[t])
                finish[t] = launch[t] + c[0]
        else:
            fill += sizes[k]
            late = max(at - launch[1], 0.0)      # on the faster timeline the bucket may have left: it waits
            launch[1] += late
            finish[1] += late
        for t, c in enumerate((full, hidden)):
            finish[t] += cost(c, k)
    fused = sum(n for n, c in zip(sizes, copied, strict=True) if c)
    total = buckets * full[0] + full[1] * sum(sizes) + 2 * full[2] * fused
    if total <= 0:
        return 0.0, 0.0, 0
    on_cores = buckets * serial[0] + serial[1] * sum(sizes) + 2 * serial[2] * fused
    exposed = max(finish[1] - backward, 0.0) + on_cores
    exposed += interference * max(total - exposed, 0.0)
    return total, exposed, buckets


def predict_plain(workload: Workload, params: PerfParams, nodes: int, global_batch: int, epochs: float = 90.0,
                  ranks_per_node: int | None = None, dataset_size: int = IMAGENET_TRAIN_IMAGES,
                  image_size: int | None = None) -> dict[str, Any]:
    """One configuration: the keys of :meth:`analysis.predict.Prediction.record` (without the integer casts)."""
    q = params.default_ranks_per_node if ranks_per_node is None else ranks_per_node
    p = nodes * q
    b = global_batch / p
    forward, backward, fixed = compute_seconds(workload, params, b, q, image_size)
    compute = forward + backward + fixed
    out: dict[str, Any] = {"forward_s": forward, "backward_s": backward, "overhead_s": fixed, "compute_s": compute}
    at_zero, at_one = (allreduce_terms(params.algorithm, n, nodes, q) for n in (0.0, 1.0))
    full_latency, serial_latency = float(at_zero.time(params.link)), float(at_zero.time(params.serial_link()))
    full_byte = float(at_one.time(params.link)) - full_latency
    serial_byte = float(at_one.time(params.serial_link())) - serial_latency
    serial_latency, serial_byte = min(serial_latency, full_latency), min(serial_byte, full_byte)
    copy = params.copy_s_per_byte * params.gradient_scale if p > 1 else 0.0
    full = (full_latency + (params.bucket_overhead_s if p > 1 else 0.0), full_byte * params.gradient_scale, copy)
    serial = (serial_latency, serial_byte * params.gradient_scale, copy * (1 - params.overlap_reduce))
    ready = ([float(f) for f in workload.event_ready_fraction] if params.overlap == "layerwise"
             else [1.0] * workload.events)
    total, exposed, buckets = schedule(workload, ready, backward, full, serial, params.fusion_bytes, params.cycle_s,
                                       params.interference)
    beyond = max(expected_max(p) - expected_max(params.jitter_included_ranks), 0.0)
    jitter = math.hypot(params.jitter_cv * compute, params.jitter_s_per_image * b) * beyond
    busy = compute + exposed + jitter
    data = b * q / params.data_images_per_s_per_node
    single_data = b / params.data_images_per_s_per_node
    if params.data_overlapped:
        iteration, single = max(busy, data), max(compute, single_data)
    else:
        iteration, single = busy + data, compute + single_data
    iterations = math.ceil(epochs * dataset_size / global_batch - 1e-9)
    measured = bool(params.measured_images_per_s.get(measured_key(workload.model, image_size)))
    sigma = params.compute_sigma_measured if measured else params.compute_sigma_roofline
    if p > 1:
        sigma = math.sqrt(sigma**2 + params.scale_sigma**2)
    widen = math.exp(INTERVAL_Z * sigma)
    hours = nodes * iterations / 3600.0
    out.update(comm_total_s=total, comm_exposed_s=exposed, jitter_s=jitter, buckets=buckets, data_s=data,
               data_exposed_s=iteration - busy, iteration_s=iteration, iterations=iterations,
               epoch_s=iteration * dataset_size / global_batch, time_to_train_s=iterations * iteration,
               images_per_s=global_batch / iteration, scaling_efficiency=single / iteration,
               node_hours=hours * iteration, iteration_s_low=iteration / widen, iteration_s_high=iteration * widen,
               images_per_s_low=global_batch / (iteration * widen), images_per_s_high=global_batch * widen / iteration,
               time_to_train_s_low=iterations * iteration / widen, time_to_train_s_high=iterations * iteration * widen,
               node_hours_low=hours * iteration / widen, node_hours_high=hours * iteration * widen)
    return out
