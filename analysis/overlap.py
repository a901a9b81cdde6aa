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

Overlap needs a free resource. With ``overlap_fraction`` f < 1, a share ``1 − f`` of every collective's time
needs the cores that compute (CPU ranks on every core: shared-memory copies, the reduction, Horovod's buffer
copies and MPI's polling progress run there), so it cannot hide behind the backward pass: the step is longer
by that CPU time wherever the schedule puts it. Only the rest, ``f·(A + B·n)`` per bucket, runs beside the
backward pass. So the schedule above runs with costs ``f·A`` and ``f·B``, and

    exposed = (1 − f)·total + max(0, finish_f − T_b)          total = buckets·A + B·Σn (full costs)

f = 1 is the pure schedule (GPUs with NCCL, CPU nodes with cores reserved for communication); f = 0 gives
``exposed = total + (the last bucket's cycle wait)``: compute and communication strictly in sequence. Buckets
form by that same schedule (with f < 1 collectives end sooner in it, so gradients fuse less: a few more α).

Vectorised: one pass over the events, each a handful of numpy operations on all configurations at once
(processed in cache-sized chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 8192


@dataclass(frozen=True)
class OverlapResult:
    finish_s: np.ndarray          # end of the last allreduce (plus the non-overlappable share), from the
                                  # start of the backward pass
    comm_total_s: np.ndarray      # sum of all allreduce times
    comm_exposed_s: np.ndarray    # communication the step waits for after the backward pass
    buckets: np.ndarray           # number of fused allreduces


def simulate(ready_fraction: np.ndarray, event_bytes: np.ndarray, backward_s, latency_s, s_per_byte,
             fusion_bytes: float, cycle_s: float, overlap_fraction: float = 1.0) -> OverlapResult:
    """Run the bucket schedule for every configuration (arrays broadcast to one shape; see module doc).

    ``cycle_s`` and ``overlap_fraction`` are one number for all configurations (configurations without
    communication, A = B = 0, get no cycle wait: nothing is exposed for them).
    """
    if not 0 <= overlap_fraction <= 1:
        raise ValueError(f"overlap_fraction must be in [0, 1], got {overlap_fraction!r}")
    backward_s, latency_s, s_per_byte = (
        np.asarray(a, dtype=float) for a in np.broadcast_arrays(backward_s, latency_s, s_per_byte))
    shape = backward_s.shape
    flat = [np.ascontiguousarray(a).reshape(-1) for a in (backward_s, latency_s, s_per_byte)]
    size = flat[0].size
    finish = np.empty(size)
    buckets = np.empty(size)
    fractions = [float(f) for f in ready_fraction]
    sizes = [float(n) for n in event_bytes]
    # Whether an event could overflow the buffer at all: events whose bytes so far fit need no check.
    cumulative = [0.0, *np.cumsum(sizes)]
    may_overflow = [c > fusion_bytes for c in cumulative[1:]]
    for start in range(0, size, CHUNK):
        part = slice(start, min(start + CHUNK, size))
        # The overlappable share of each bucket's cost goes through the schedule.
        finish[part], buckets[part] = _simulate_chunk(fractions, sizes, cumulative, may_overflow, flat[0][part],
                                                      overlap_fraction * flat[1][part],
                                                      overlap_fraction * flat[2][part], float(fusion_bytes),
                                                      0.5 * float(cycle_s))
    total_bytes = float(np.sum(event_bytes))
    comm_total = buckets * flat[1] + flat[2] * total_bytes
    no_comm = comm_total <= 0
    # The share that occupies the compute cores lengthens the step whatever the schedule.
    serial = np.where(no_comm, 0.0, (1.0 - overlap_fraction) * comm_total)
    finish = np.where(no_comm, flat[0], finish)
    buckets = np.where(no_comm, 0.0, buckets)
    exposed = np.maximum(finish - flat[0], 0.0) + serial
    finish = finish + serial
    return OverlapResult(finish_s=finish.reshape(shape), comm_total_s=comm_total.reshape(shape),
                         comm_exposed_s=exposed.reshape(shape), buckets=buckets.reshape(shape))


def _simulate_chunk(fractions: list[float], sizes: list[float], cumulative: list[float], may_overflow: list[bool],
                    backward: np.ndarray, latency: np.ndarray, per_byte: np.ndarray, fusion: float,
                    half_cycle: float) -> tuple[np.ndarray, np.ndarray]:
    # State of the open bucket: launch time, finish time if it closed now, and the bytes of all events
    # before its first one (its fill is cumulative bytes minus that). Earlier buckets are finished by the
    # time it launches. Times are relative to the start of the backward pass.
    launch = fractions[0] * backward + half_cycle
    finish = launch + latency + per_byte * sizes[0]
    track = any(may_overflow)
    before_open = np.zeros_like(backward)
    count = np.ones_like(backward)
    ready = np.empty_like(backward)
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
        # The new bucket launches when the previous one is done and the thread's next cycle comes round.
        ready += half_cycle
        np.maximum(ready, finish, out=ready)
        np.copyto(launch, ready, where=opens)
        ready += latency
        np.copyto(finish, ready, where=opens)
        np.multiply(per_byte, nbytes, out=moved)
        finish += moved
        count += opens
    return finish, count
