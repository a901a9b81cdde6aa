"""`larscale bench-comm`: an OSU-style MPI allreduce benchmark whose CSV `larscale calibrate` fits.

Every rank runs :func:`run_benchmark` (``mpirun -np N python -m larscale bench-comm ...``). For each message
size n (bytes of float32, 4 B up to 64 MiB by default, doubling):

- **warm-up**: a few untimed calls (connections are opened, buffers faulted in, protocols settle);
- **repetitions**: every repetition starts with ``MPI_Barrier`` and times ``k`` back-to-back calls with
  ``MPI_Wtime``; ``k`` is chosen once per size (the same on all ranks) so one repetition lasts at least
  ``min_rep_s``: a lone 4-byte allreduce is shorter than the clock's and the barrier's jitter;
- the time of a repetition is the **maximum over ranks** of (elapsed / k): a collective is done when its
  slowest rank is done;
- per size: mean, median, standard deviation and the 95 % confidence interval of the mean (Student t over
  the repetitions), minimum and maximum.

The time is algorithm-agnostic: whatever algorithm the MPI library picked for (n, p). Bandwidths follow the
nccl-tests convention, from the median time t: ``algbw = n / t`` and, for allreduce,
``busbw = algbw · 2(p−1)/p`` (equal to the link's bytes/s when a bandwidth-optimal allreduce runs at link
speed, whatever p).

Two more operations make the α-β-γ parameters separable (see :mod:`analysis.fit_comm`): the ring allreduce
costs ``2(p−1)α + (p−1)/p·n·(2β + γ)``, so allreduce times alone never tell β from γ, at any p.

- ``pingpong``: ranks 2i and 2i+1 bounce n bytes; the one-way time (half a round trip) is ``α + nβ``;
- ``reduce_local``: every rank at once times ``numpy.add(a, b, out=a)`` on n bytes: ``c + nγ``, the
  per-byte cost of the reduction arithmetic under the same memory contention as inside the collective.

CSV columns: :data:`larscale.benchformat.CSV_COLUMNS`; one row per (operation, size). ``nodes`` counts
shared-memory domains (``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)``), so two "hosts" that are network namespaces
of one machine count as two nodes, as Open MPI sees them.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from larscale.benchformat import (
    CSV_OPERATIONS,
    MIB,
    OPERATIONS,
    bandwidths,
    message_sizes,
    summarize,
)

# Environment variables set by the launchers we know: a process with none of them was not started by one.
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MPI_LOCALNRANKS",
                      "SLURM_STEP_ID", "HOROVOD_RANK")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how long to try; defaults follow the OSU micro-benchmarks' spirit."""

    min_bytes: int = 4
    max_bytes: int = 64 * MIB
    factor: int = 2                     # sizes grow by this factor
    warmup: int = 5                     # untimed calls per size (fewer when one call is slow, see below)
    repetitions: int = 20               # timed repetitions per size (fewer when the size is slow)
    min_rep_s: float = 1e-3             # a repetition batches calls until it lasts at least this
    max_iterations_per_rep: int = 1000
    max_seconds_per_size: float = 10.0  # time budget of one size's warm-up + repetitions
    min_repetitions: int = 3            # never fewer, whatever the budget: a CI needs a spread
    operations: tuple[str, ...] = OPERATIONS
    label: str = ""

    def __post_init__(self) -> None:
        if not 4 <= self.min_bytes <= self.max_bytes:
            raise ValueError(f"need 4 <= min_bytes <= max_bytes, got {self.min_bytes} and {self.max_bytes}")
        if self.factor < 2:
            raise ValueError(f"size factor must be >= 2, got {self.factor}")
        if self.repetitions < 2 or self.min_repetitions < 2:
            raise ValueError(f"need at least 2 repetitions for a confidence interval, got {self.repetitions}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        unknown = [op for op in self.operations if op not in CSV_OPERATIONS]
        if unknown or not self.operations:
            raise ValueError(f"unknown operation(s) {unknown}; choose from {', '.join(CSV_OPERATIONS)}")


def launched_by_mpi(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(name in env for name in LAUNCHER_VARIABLES)


def _topology(comm) -> tuple[int, int]:
    """(nodes, ranks_per_node): shared-memory domains as the MPI library sees them."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        leaders = comm.allreduce(1 if local.Get_rank() == 0 else 0, op=MPI.SUM)
        per_node = comm.allreduce(local.Get_size(), op=MPI.MAX)
    finally:
        local.Free()
    return leaders, per_node


class _Timer:
    """Times one operation at one size on every rank, the same way for all operations."""

    def __init__(self, comm, config: BenchConfig):
        from mpi4py import MPI

        self.comm, self.config, self.mpi = comm, config, MPI

    def _batch(self, call, count: int) -> float:
        """Seconds per call of ``count`` back-to-back calls after a barrier, max over ranks."""
        self.comm.Barrier()
        start = self.mpi.Wtime()
        for _ in range(count):
            call()
        elapsed = (self.mpi.Wtime() - start) / count
        return self.comm.allreduce(elapsed, op=self.mpi.MAX)

    def measure(self, call) -> tuple[list[float], int]:
        """(per-repetition times, calls per repetition). Every rank returns the same numbers."""
        cfg = self.config
        first = self._batch(call, 1)               # opens connections, faults pages: never timed
        budget = cfg.max_seconds_per_size
        warmup = max(1, min(cfg.warmup, int(0.2 * budget / max(first, 1e-9))))
        # The median of single calls: a batch's mean would inherit any preemption that hit it.
        estimate = statistics.median(self._batch(call, 1) for _ in range(warmup))
        per_rep = int(min(cfg.max_iterations_per_rep, max(1, math.ceil(cfg.min_rep_s / max(estimate, 1e-9)))))
        fit = int(0.8 * budget / max(estimate * per_rep, 1e-9))
        repetitions = max(cfg.min_repetitions, min(cfg.repetitions, fit))
        local = np.empty(repetitions)
        for i in range(repetitions):
            self.comm.Barrier()
            start = self.mpi.Wtime()
            for _ in range(per_rep):
                call()
            local[i] = (self.mpi.Wtime() - start) / per_rep
        # One reduction for all repetitions: reducing inside the loop would add its own time between them.
        slowest = np.empty_like(local)
        self.comm.Allreduce(local, slowest, op=self.mpi.MAX)
        return slowest.tolist(), per_rep


def _allreduce_call(comm, elements: int):
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    send = np.full(elements, rank + 1, dtype=np.float32)
    recv = np.zeros(elements, dtype=np.float32)

    def call() -> None:
        comm.Allreduce(send, recv, op=MPI.SUM)

    call()
    expected = size * (size + 1) / 2
    if recv[0] != expected or recv[-1] != expected:
        raise RuntimeError(f"allreduce of {elements} float32 gave {recv[0]}, expected {expected}")
    return call


def _pingpong_call(comm, elements: int):
    """One round trip between partners 2i and 2i+1 (a rank without a partner idles)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    buffer = np.zeros(elements, dtype=np.float32)
    partner = rank ^ 1
    if partner >= size:
        return lambda: None
    if rank % 2 == 0:
        def call() -> None:
            comm.Send(buffer, dest=partner, tag=7)
            comm.Recv(buffer, source=partner, tag=7)
    else:
        def call() -> None:
            comm.Recv(buffer, source=partner, tag=7)
            comm.Send(buffer, dest=partner, tag=7)
    return call


def _reduce_local_call(elements: int):
    accumulator = np.ones(elements, dtype=np.float32)
    incoming = np.ones(elements, dtype=np.float32)

    def call() -> None:
        np.add(accumulator, incoming, out=accumulator)

    return call


CallFactory = Callable[[int], Callable[[], None]]


def run_benchmark(comm, config: BenchConfig, factories: Mapping[str, CallFactory] | None = None,
                  library: str | None = None) -> list[dict[str, Any]]:
    """Measure on every rank of ``comm``; rank 0 returns the rows (:data:`CSV_COLUMNS`), others ``[]``.

    ``factories`` supplies operations beyond the built-in MPI ones: ``factory(elements)`` returns the call to
    time (after checking one call's result), or None for a size the operation cannot run (no row).
    ``library`` overrides the ``mpi_library`` column.
    """
    from mpi4py import MPI

    factories = dict(factories or {})
    missing = [op for op in config.operations if op not in OPERATIONS and op not in factories]
    if missing:
        raise ValueError(f"operation(s) {', '.join(missing)} are measured by `larscale bench-hvd` (they need "
                         "torch and Horovod), not by bench-comm")
    rank, size = comm.Get_rank(), comm.Get_size()
    nodes, ranks_per_node = _topology(comm)
    library = library or MPI.Get_library_version().splitlines()[0].strip()
    timer = _Timer(comm, config)
    rows: list[dict[str, Any]] = []
    for operation in config.operations:
        if operation == "pingpong" and size < 2:
            continue
        for nbytes in message_sizes(config.min_bytes, config.max_bytes, config.factor):
            elements = nbytes // 4
            if operation in factories:
                call = factories[operation](elements)
                if call is None:
                    continue
            elif operation == "allreduce":
                call = _allreduce_call(comm, elements)
            elif operation == "pingpong":
                call = _pingpong_call(comm, elements)
            else:
                call = _reduce_local_call(elements)
            samples, per_rep = timer.measure(call)
            if operation == "pingpong":
                samples = [s / 2 for s in samples]     # one way: half a round trip
            stats = summarize(samples)
            algbw, busbw = bandwidths(operation, nbytes, stats.median, size)
            rows.append({
                "operation": operation, "ranks": size, "nodes": nodes, "ranks_per_node": ranks_per_node,
                "bytes": nbytes, "elements": elements, "dtype": "float32", "iterations_per_rep": per_rep,
                "repetitions": stats.count, "mean_s": stats.mean, "median_s": stats.median,
                "std_s": stats.std, "ci95_low_s": stats.ci95_low, "ci95_high_s": stats.ci95_high,
                "min_s": stats.minimum, "max_s": stats.maximum, "algbw_gbytes_per_s": algbw,
                "busbw_gbytes_per_s": busbw, "label": config.label, "mpi_library": library,
            })
    return rows if rank == 0 else []


