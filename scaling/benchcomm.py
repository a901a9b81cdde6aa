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

With ``--device cuda`` the three operations run on torch tensors in GPU memory, each rank on the GPU of its local
rank: ``allreduce`` and ``pingpong`` hand the device pointers to MPI (a CUDA-aware library moves them itself, over
NVLink/PCIe peer copies, GPUDirect RDMA or its own staging) and ``reduce_local`` adds on the device. The library is
asked first (:func:`mpi_gpu_support`) and a library that does not say it is GPU-aware is refused with one line:
handing device pointers to a host-only MPI crashes or corrupts memory. ``larscale bench-hvd --device cuda`` times
NCCL/RCCL instead, the path Horovod's GPU gradients take.

CSV columns: :data:`larscale.benchformat.CSV_COLUMNS`; one row per (operation, size). ``nodes`` counts
shared-memory domains (``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)``), so two "hosts" that are network namespaces
of one machine count as two nodes, as Open MPI sees them.
"""

from __future__ import annotations

import ctypes
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

# The extensions with which Open MPI (cuda, rocm) and MPICH (cuda, hip) say whether their build and run time move
# GPU buffers; each takes no argument and returns 1 or 0.
GPU_QUERIES = {"cuda": ("MPIX_Query_cuda_support",), "rocm": ("MPIX_Query_rocm_support", "MPIX_Query_hip_support")}
# Libraries without such a query turn GPU buffers on with a documented variable (1 = on): Cray MPICH (the MPI of
# Frontier, Perlmutter and Polaris) and MVAPICH2-GDR.
GPU_SWITCHES = {"cuda": {"MPICH_GPU_SUPPORT_ENABLED": "Cray MPICH", "MV2_USE_CUDA": "MVAPICH2-GDR"},
                "rocm": {"MPICH_GPU_SUPPORT_ENABLED": "Cray MPICH", "MV2_USE_ROCM": "MVAPICH2-GDR"}}

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


def mpi_library_name() -> str:
    """The first line of MPI_Get_library_version (Open MPI ends the string with a NUL)."""
    from mpi4py import MPI

    return MPI.Get_library_version().splitlines()[0].strip(" \x00")


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


CallFactory = Callable[[int], Callable[[], None]]


def buffer_factories(comm, filled: Callable[[int, float], Any], add: Callable[[Any, Any], None],
                     synchronize: Callable[[], None] = lambda: None, where: str = "host memory"
                     ) -> dict[str, CallFactory]:
    """The three operations on buffers that ``filled(elements, value)`` makes (float32) and ``add`` sums in place:
    ``allreduce`` and ``pingpong`` through MPI, ``reduce_local`` as the local add. ``synchronize`` waits for the
    device: MPI may read a buffer only once the kernel that filled it is done, and a timed add ends when the device
    has finished it. Each call is checked once before it is timed."""
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()

    def allreduce(elements: int) -> Callable[[], None]:
        send, recv = filled(elements, float(rank + 1)), filled(elements, 0.0)
        synchronize()

        def call() -> None:
            comm.Allreduce(send, recv, op=MPI.SUM)

        call()
        expected = size * (size + 1) / 2
        ends = (float(recv[0]), float(recv[-1]))
        if ends != (expected, expected):
            raise RuntimeError(f"allreduce of {elements} float32 in {where} gave {ends} at the ends, expected "
                               f"{expected}")
        return call

    def pingpong(elements: int) -> Callable[[], None]:
        """One round trip between partners 2i and 2i+1 (a rank without a partner idles)."""
        buffer, partner = filled(elements, float(rank)), rank ^ 1
        if partner >= size:
            return lambda: None
        synchronize()
        first, second = ((lambda: comm.Send(buffer, dest=partner, tag=7)),
                         (lambda: comm.Recv(buffer, source=partner, tag=7)))
        if rank % 2:
            first, second = second, first

        def call() -> None:
            first()
            second()

        call()
        if float(buffer[-1]) != min(rank, partner):   # after a round trip both hold the even rank's values
            raise RuntimeError(f"ping-pong of {elements} float32 in {where} left {float(buffer[-1])} on rank {rank}, "
                               f"expected {min(rank, partner)}")
        return call

    def reduce_local(elements: int) -> Callable[[], None]:
        accumulator, incoming = filled(elements, 1.0), filled(elements, 1.0)
        synchronize()

        def call() -> None:
            add(accumulator, incoming)
            synchronize()

        return call

    return {"allreduce": allreduce, "pingpong": pingpong, "reduce_local": reduce_local}


def host_factories(comm) -> dict[str, CallFactory]:
    """bench-comm's own operations, on NumPy buffers in host memory."""
    return buffer_factories(comm, lambda elements, value: np.full(elements, value, dtype=np.float32),
                            lambda accumulator, incoming: np.add(accumulator, incoming, out=accumulator))


def run_benchmark(comm, config: BenchConfig, factories: Mapping[str, CallFactory] | None = None,
                  library: str | None = None, device: str = "cpu") -> list[dict[str, Any]]:
    """Measure on every rank of ``comm``; rank 0 returns the rows (:data:`CSV_COLUMNS`), others ``[]``.

    ``factories`` supplies operations beyond (or instead of) the built-in MPI ones: ``factory(elements)`` returns
    the call to time (after checking one call's result), or None for a size the operation cannot run (no row).
    ``library`` overrides the ``mpi_library`` column; ``device`` is the ``device`` column of the factories' rows
    (where their buffers live), the built-in operations' rows say ``cpu``.
    """
    factories = dict(factories or {})
    missing = [op for op in config.operations if op not in OPERATIONS and op not in factories]
    if missing:
        raise ValueError(f"operation(s) {', '.join(missing)} are measured by `larscale bench-hvd` (they need "
                         "torch and Horovod), not by bench-comm")
    rank, size = comm.Get_rank(), comm.Get_size()
    nodes, ranks_per_node = _topology(comm)
    library = library or mpi_library_name()
    timer = _Timer(comm, config)
    builtin = host_factories(comm)
    rows: list[dict[str, Any]] = []
    for operation in config.operations:
        if operation == "pingpong" and size < 2:
            continue
        for nbytes in message_sizes(config.min_bytes, config.max_bytes, config.factor):
            elements = nbytes // 4
            call = factories.get(operation, builtin.get(operation))(elements)
            if call is None:
                continue
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
                "device": device if operation in factories else "cpu",
            })
    return rows if rank == 0 else []


def _exported(names: tuple[str, ...]) -> tuple[str, Callable[[], int]] | None:
    """The first of ``names`` that the MPI library loaded in this process exports, as a C function of no argument."""
    handles = [ctypes.CDLL(None)]
    try:   # mpi4py may have loaded the library privately: open it again by the path the process mapped
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/libmpi" in line and ".so" in line})
    except OSError:
        paths = []
    handles += [ctypes.CDLL(path) for path in paths]
    for name in names:
        for handle in handles:
            function = getattr(handle, name, None)
            if function is not None:
                function.restype, function.argtypes = ctypes.c_int, []
                return name, function
    return None


def gpu_support_verdict(kind: str, query: tuple[str, int] | None,
                        environ: Mapping[str, str]) -> tuple[bool | None, str]:
    """(GPU-aware?, the evidence) from the library's own answer, else a switch variable; None: nothing says."""
    if query is not None:
        name, value = query
        return value != 0, f"{name}() = {value}"
    for variable, library in GPU_SWITCHES[kind].items():
        if variable in environ:
            return environ[variable].strip() == "1", f"{variable}={environ[variable]} ({library})"
    return None, (f"the library exports no {' or '.join(GPU_QUERIES[kind])} and none of "
                  f"{', '.join(GPU_SWITCHES[kind])} is set")


def mpi_gpu_support(kind: str = "cuda", environ: Mapping[str, str] | None = None) -> tuple[bool | None, str]:
    """Whether the MPI library in this process (after MPI_Init) moves ``kind`` ('cuda' or 'rocm') buffers itself."""
    found = _exported(GPU_QUERIES[kind])
    query = None if found is None else (found[0], found[1]())
    return gpu_support_verdict(kind, query, os.environ if environ is None else environ)


def tensor_factories(comm, place) -> dict[str, CallFactory]:
    """bench-comm's operations on torch tensors at ``place`` (a torch.device), handed to mpi4py by DLPack/CUDA
    array interface; the local add is a torch add there."""
    import torch

    return buffer_factories(
        comm, lambda elements, value: torch.full((elements,), value, dtype=torch.float32, device=place),
        lambda accumulator, incoming: torch.add(accumulator, incoming, out=accumulator),
        torch.cuda.synchronize if place.type == "cuda" else (lambda: None), f"{place} memory")


def device_factories(comm, device: str) -> tuple[dict[str, CallFactory], str]:
    """The operations on ``device`` buffers, each rank on its local rank's GPU, and the CSV's library text.

    Refuses (:class:`larscale.UsageError`, one line) an MPI library that does not say it moves GPU buffers, before
    any device pointer reaches it."""
    import torch
    from mpi4py import MPI

    from larscale import UsageError

    library = mpi_library_name()
    kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
    aware, evidence = mpi_gpu_support(kind)
    if not aware:
        verdict = "is not GPU-aware" if aware is False else "does not say it is GPU-aware"
        raise UsageError(f"--device {device}: the MPI library ({library}) {verdict} for {kind.upper()} buffers "
                         f"({evidence}); use an MPI built with {kind.upper()} support (Cray MPICH with "
                         f"MPICH_GPU_SUPPORT_ENABLED=1, Open MPI --with-{kind}, MVAPICH2-GDR with "
                         f"{list(GPU_SWITCHES[kind])[1]}=1) or time NCCL/RCCL with `larscale bench-hvd --device "
                         f"{device}`")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this PyTorch sees no GPU on rank {comm.Get_rank()}")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        local_rank, local_size = local.Get_rank(), local.Get_size()
    finally:
        local.Free()
    gpus = torch.cuda.device_count()
    torch.cuda.set_device(local_rank % gpus)
    shared = f", {-(-local_size // gpus)} ranks per GPU" if local_size > gpus else ""
    text = f"{library}; {kind.upper()}-aware: {evidence}; {torch.cuda.get_device_name()}{shared}"
    return tensor_factories(comm, torch.device("cuda", local_rank % gpus)), text
