"""Overlap of gradient allreduce with the backward pass, the way Horovod schedules it.

Gradients become ready layer by layer in backward order (events of :class:`analysis.workload.Workload`, at
fraction ``r_k`` of the backward time ``T_b``, carrying ``n_k`` bytes). Horovod's background thread runs in
cycles: it fuses every gradient that is ready when it starts a collective into one buffer (at most the fusion
buffer size; a larger tensor travels alone), runs that allreduce to completion, and starts the next one. A
collective of ``n`` bytes costs ``A + B·n`` (:func:`analysis.comm.allreduce_affine`). The model:

- the first bucket launches half a cycle (the expected wait for the next cycle) after its first gradient;
- a gradient joins the bucket being formed if it is ready by that bucket's launch time and fits in the
  buffer; otherwise it opens the next bucket, which launches at ``max(previous bucket's finish,
  ready time + cycle/2)``;
- buckets run one after another: ``finish = launch + A + B·bytes``.

The step's communication is *exposed* for ``max(0, finish_of_last_bucket − T_b)``: the optimizer waits for
it. With one rank there is nothing to communicate and nothing is exposed. The total communication time is
``buckets·A + B·Σn`` (B is linear), of which ``total − exposed`` is hidden behind the backward pass.

Overlap needs a free resource. Part of a collective's time may need the very cores that compute — CPU ranks
on every core: shared-memory transfers (the cores copy the bytes), the reduction's adds, MPI's progress — and
that part cannot hide behind the backward pass: the step is longer by it wherever the schedule puts it. The
profile says which share of each cost term can overlap (``overlap_fraction`` of each link, for its α and β,
and ``reduce_overlap_fraction`` for γ; :meth:`analysis.params.PerfParams.serial_link`). As the cost is
linear in α, β, γ, a bucket's cost splits into a compute-core part ``A_s + B_s·n`` and an overlappable
part ``(A − A_s) + (B − B_s)·n``. Which gradients fuse is decided with the *full* costs: Horovod's background
thread is busy for a collective's whole duration whichever cores do the work, and what becomes ready meanwhile
waits for the next bucket. When the buckets end is timed with the overlappable parts only, and

    exposed = serial + max(0, finish − T_b)            serial = buckets·A_s + B_s·Σn

With every share 1 (the default: GPUs with NCCL, CPU nodes with cores reserved for communication) this is
the pure schedule; with every share 0, ``exposed = total + (the last bucket's cycle wait)``: compute and
communication strictly in sequence. (Buckets form on the pure schedule, not on the overlappable timeline: with every
share 0 a collective takes no time there, so no gradients would fuse — 54 buckets a ResNet-50 step, each paying
α, where Horovod fuses them.)

Fusion copies. Horovod fuses *tensors*: a bucket of two or more is copied into the fusion buffer before its
collective and back out after it; a tensor larger than the buffer goes alone and is reduced where it lies.
The tables are per layer, and every layer with parameters has two or more tensors (weight and bias,
BatchNorm's scale and shift; a bias-free convolution is ready with its BatchNorm), so every bucket is copied,
except an event larger than the buffer: ``2·δ·n`` more for its ``n`` bytes (δ seconds per byte copied,
``network.fusion_copy_gbytes_per_s``; 0 when the profile does not say). Between two local ranks a 60 MiB Horovod
allreduce took 37 ms as one tensor and 54-56 ms as 16 or 64 grouped ones (bench-hvd's
``horovod_allreduce_fused`` rows): δ ≈ 0.14 ns/B, 7 GB/s, one core's memcpy rate. ResNet-50 pays it on all
~100 MB of its gradients (~29 ms a step), AlexNet not on its 151 MB fc6 weight. The copies are memory work of
the cores that run the collective, so their compute-core share is the reduction's (``1 − reduce_overlap_fraction``).

Overlap is not free. Collective kernels running beside the backward pass take SMs (NCCL runs a block per
channel) and memory bandwidth from it: the pass slows by ``interference`` seconds per second of communication it
hides (``network.collectives.interference``; 0.05 for GPUs, fitted on the validation set's fit rows together
with the wait for the slowest rank, analysis/README.md), so
``exposed += interference · (total − exposed)``. Each bucket also pays the framework's own cost (DDP's bucket
launch, Horovod's negotiation: ``bucket_overhead_us``, added to the collective's latency A by
:func:`analysis.predict.predict_from`), and Horovod's cycle delays idle launches (above).

Vectorised: one pass over the events, each a handful of numpy operations on all configurations at once
(processed in cache-sized chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 8192


@dataclass(frozen=True)
class OverlapResult:
    finish_s: np.ndarray          # end of the last allreduce (plus the compute-core share), from the start
                                  # of the backward pass
    comm_total_s: np.ndarray      # sum of all allreduce times
    comm_exposed_s: np.ndarray    # communication the step waits for after the backward pass
    buckets: np.ndarray           # number of allreduces (a bucket: one or more gradients)
    fused_bytes: np.ndarray       # bytes copied into the fusion buffer and out (every event that fits in it)


def simulate(ready_fraction: np.ndarray, event_bytes: np.ndarray, backward_s, latency_s, s_per_byte,
             fusion_bytes: float, cycle_s: float, serial_latency_s=0.0, serial_s_per_byte=0.0,
             copy_s_per_byte=0.0, serial_copy_s_per_byte=0.0, interference: float = 0.0) -> OverlapResult:
    """Run the bucket schedule for every configuration (arrays broadcast to one shape; see module doc).

    ``latency_s``, ``s_per_byte``: a collective's full cost ``A + B·n``; ``serial_latency_s``,
    ``serial_s_per_byte``: the part of it that occupies the compute cores (``A_s ≤ A``, ``B_s ≤ B``).
    ``copy_s_per_byte`` δ: one copy of a byte through the fusion buffer (two per copied byte), of which
    ``serial_copy_s_per_byte`` occupies the compute cores. ``cycle_s`` is one number for all configurations
    (configurations without communication, A = B = 0, get no cycle wait: nothing is exposed for them).
    ``interference``: seconds the backward pass loses per second of communication hidden behind it.
    """
    arrays = [np.asarray(a, dtype=float) for a in np.broadcast_arrays(
        backward_s, latency_s, s_per_byte, serial_latency_s, serial_s_per_byte, copy_s_per_byte,
        serial_copy_s_per_byte)]
    shape = arrays[0].shape
    flat = [np.ascontiguousarray(a).reshape(-1) for a in arrays]
    if (np.any(flat[3] < 0) or np.any(flat[4] < 0) or np.any(flat[3] > flat[1]) or np.any(flat[4] > flat[2])
            or np.any(flat[6] < 0) or np.any(flat[6] > flat[5])):
        raise ValueError("the compute-core share of a collective must lie between 0 and its full cost")
    size = flat[0].size
    finish = np.empty(size)
    buckets = np.empty(size)
    with_serial = bool(np.any(flat[3] > 0) or np.any(flat[4] > 0) or np.any(flat[6] > 0))
    fractions = [float(f) for f in ready_fraction]
    sizes = [float(n) for n in event_bytes]
    # Whether an event could overflow the buffer at all: events whose bytes so far fit need no check.
    cumulative = [0.0, *np.cumsum(sizes)]
    may_overflow = [c > fusion_bytes for c in cumulative[1:]]
    # Copied through the fusion buffer: every event that fits in it (see the module doc).
    copied = [n <= fusion_bytes for n in sizes]
    fused_bytes = float(sum(n for n, c in zip(sizes, copied, strict=True) if c))
    for start in range(0, size, CHUNK):
        part = slice(start, min(start + CHUNK, size))
        full = _Costs.of(flat[1][part], flat[2][part], flat[5][part])
        hidden = (_Costs.of(flat[1][part] - flat[3][part], flat[2][part] - flat[4][part],
                            flat[5][part] - flat[6][part]) if with_serial else None)
        finish[part], buckets[part] = _simulate_chunk(fractions, sizes, cumulative, may_overflow, copied,
                                                      flat[0][part], full, hidden, float(fusion_bytes),
                                                      0.5 * float(cycle_s))
    total_bytes = float(np.sum(event_bytes))
    comm_total = buckets * flat[1] + flat[2] * total_bytes + 2.0 * flat[5] * fused_bytes
    no_comm = comm_total <= 0
    # The part that occupies the compute cores lengthens the step whatever the schedule.
    serial = np.where(no_comm, 0.0, buckets * flat[3] + flat[4] * total_bytes + 2.0 * flat[6] * fused_bytes)
    finish = np.where(no_comm, flat[0], finish)
    buckets = np.where(no_comm, 0.0, buckets)
    fused = np.where(no_comm, 0.0, fused_bytes)
    exposed = np.maximum(finish - flat[0], 0.0) + serial
    if interference:
        # The collectives that hide behind the backward pass take SMs and memory bandwidth from it.
        exposed = exposed + interference * np.maximum(comm_total - exposed, 0.0)
    finish = finish + serial
    return OverlapResult(finish_s=finish.reshape(shape), comm_total_s=comm_total.reshape(shape),
                         comm_exposed_s=exposed.reshape(shape), buckets=buckets.reshape(shape),
                         fused_bytes=fused.reshape(shape))


@dataclass(frozen=True)
class _Costs:
    """One chunk's per-collective costs on one timeline: latency, and seconds per byte of a gradient that goes
    alone (``per_byte``) or through the fusion buffer (``copied_per_byte``: two copies more)."""

    latency: np.ndarray
    per_byte: np.ndarray
    copied_per_byte: np.ndarray

    @classmethod
    def of(cls, latency: np.ndarray, per_byte: np.ndarray, copy: np.ndarray) -> _Costs:
        return cls(latency, per_byte, per_byte + 2.0 * copy if np.any(copy > 0) else per_byte)


def _simulate_chunk(fractions: list[float], sizes: list[float], cumulative: list[float], may_overflow: list[bool],
                    copied: list[bool], backward: np.ndarray, full: _Costs, hidden: _Costs | None, fusion: float,
                    half_cycle: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns the last bucket's finish on the ``hidden`` timeline (``full`` when None) and the bucket count.

    Two timelines share one set of buckets. On ``full`` each collective takes its whole cost: the background
    thread is busy that long whichever cores do the work, so it decides which gradients fuse. On ``hidden``
    a collective takes only its overlappable part: when it ends decides what the step waits for.
    """
    # State of the open bucket: launch time and finish time if it closed now (per timeline), and the bytes of
    # all events before its first one (its fill is cumulative bytes minus that). Earlier buckets are finished
    # by the time it launches. Times are relative to the start of the backward pass.
    timelines = [full] if hidden is None else [full, hidden]
    launches = [fractions[0] * backward + half_cycle for _ in timelines]
    finishes = [launch + c.latency + (c.copied_per_byte if copied[0] else c.per_byte) * sizes[0]
                for launch, c in zip(launches, timelines, strict=True)]
    launch = launches[0]
    track = any(may_overflow)
    before_open = np.zeros_like(backward)
    count = np.ones_like(backward)
    ready = np.empty_like(backward)
    start = np.empty_like(backward)
    late = np.empty_like(backward)
    moved = np.empty_like(backward)
    opens = np.empty(backward.shape, dtype=bool)
    fits = np.empty(backward.shape, dtype=bool)
    for k in range(1, len(fractions)):
        nbytes = sizes[k]
        np.multiply(backward, fractions[k], out=ready)
        # A gradient opens a new bucket if the open one launched before it was ready, or it does not fit.
        np.greater(ready, launch, out=opens)
        if nbytes > fusion:
            opens[:] = True
        elif may_overflow[k]:
            # fill + nbytes > fusion  ⇔  before_open < cumulative bytes through this event − fusion
            np.less(before_open, cumulative[k + 1] - fusion, out=fits)
            opens |= fits
        if track:
            np.copyto(before_open, cumulative[k], where=opens)
        if hidden is not None:
            # A gradient joins a bucket it was ready for on the full timeline; on the hidden one, where
            # collectives end sooner, that bucket may have launched earlier: it waits for the gradient.
            np.subtract(ready, launches[1], out=late)
            np.maximum(late, 0.0, out=late)
            np.copyto(late, 0.0, where=opens)
            launches[1] += late
            finishes[1] += late
        # The new bucket launches when the previous one is done and the thread's next cycle comes round.
        ready += half_cycle
        for costs, begin, end in zip(timelines, launches, finishes, strict=True):
            np.maximum(ready, end, out=start)
            np.copyto(begin, start, where=opens)
            start += costs.latency
            np.copyto(end, start, where=opens)
            np.multiply(costs.copied_per_byte if copied[k] else costs.per_byte, nbytes, out=moved)
            end += moved
        count += opens
    return finishes[-1], count
