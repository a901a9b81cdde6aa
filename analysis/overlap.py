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

Vectorised: one pass over the events, each a handful of numpy operations on all configurations at once
(processed in cache-sized chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 16384


@dataclass(frozen=True)
class OverlapResult:
    finish_s: np.ndarray          # end of the last allreduce, from the start of the backward pass
    comm_total_s: np.ndarray      # sum of all allreduce times
    comm_exposed_s: np.ndarray    # communication the step waits for after the backward pass
    buckets: np.ndarray           # number of fused allreduces


def simulate(ready_fraction: np.ndarray, event_bytes: np.ndarray, backward_s, latency_s, s_per_byte,
             fusion_bytes: float, cycle_s) -> OverlapResult:
    """Run the bucket schedule for every configuration (arrays broadcast to one shape; see module doc)."""
    backward_s, latency_s, s_per_byte, cycle_s = (
        np.asarray(a, dtype=float) for a in np.broadcast_arrays(backward_s, latency_s, s_per_byte, cycle_s))
    shape = backward_s.shape
    flat = [a.reshape(-1) for a in (backward_s, latency_s, s_per_byte, cycle_s)]
    size = flat[0].size
    finish = np.empty(size)
    buckets = np.empty(size)
    fractions = [float(f) for f in ready_fraction]
    sizes = [float(n) for n in event_bytes]
    for start in range(0, size, CHUNK):
        part = slice(start, min(start + CHUNK, size))
        finish[part], buckets[part] = _simulate_chunk(fractions, sizes, *(a[part] for a in flat),
                                                      float(fusion_bytes))
    total_bytes = float(np.sum(event_bytes))
    comm_total = buckets * flat[1] + flat[2] * total_bytes
    no_comm = comm_total <= 0
    finish = np.where(no_comm, flat[0], finish)
    buckets = np.where(no_comm, 0.0, buckets)
    exposed = np.maximum(finish - flat[0], 0.0)
    return OverlapResult(finish_s=finish.reshape(shape), comm_total_s=comm_total.reshape(shape),
                         comm_exposed_s=exposed.reshape(shape), buckets=buckets.reshape(shape))


def _simulate_chunk(fractions: list[float], sizes: list[float], backward: np.ndarray, latency: np.ndarray,
                    per_byte: np.ndarray, cycle: np.ndarray, fusion: float) -> tuple[np.ndarray, np.ndarray]:
    half_cycle = 0.5 * cycle
    # Open bucket: its launch time and bytes. Buckets before it are finished by the time it launches.
    launch = fractions[0] * backward + half_cycle
    filled = np.full_like(backward, sizes[0])
    count = np.ones_like(backward)
    ready = np.empty_like(backward)
    finish = np.empty_like(backward)
    joins = np.empty(backward.shape, dtype=bool)
    fits = np.empty(backward.shape, dtype=bool)
    for fraction, nbytes in zip(fractions[1:], sizes[1:], strict=True):
        np.multiply(backward, fraction, out=ready)
        # finish of the open bucket if it closed now
        np.multiply(per_byte, filled, out=finish)
        finish += latency
        finish += launch
        np.less_equal(ready, launch, out=joins)
        if nbytes <= fusion:
            np.less_equal(filled, fusion - nbytes, out=fits)
            joins &= fits
        else:
            joins[:] = False
        # A new bucket launches when the previous one is done and the thread's next cycle comes round.
        opens = ~joins
        ready += half_cycle
        np.maximum(ready, finish, out=ready)
        np.copyto(launch, ready, where=opens)
        filled += nbytes
        np.copyto(filled, nbytes, where=opens)
        count += opens
    return launch + latency + per_byte * filled, count
