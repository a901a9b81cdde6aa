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

Two more operations make the α-β-γ parameters separable (see :mod:`analysis.calibrate`): the ring allreduce
costs ``2(p−1)α + (p−1)/p·n·(2β + γ)``, so allreduce times alone never tell β from γ, at any p.

- ``pingpong``: ranks 2i and 2i+1 bounce n bytes; the one-way time (half a round trip) is ``α + nβ``;
- ``reduce_local``: every rank at once times ``numpy.add(a, b, out=a)`` on n bytes: ``c + nγ``, the
  per-byte cost of the reduction arithmetic under the same memory contention as inside the collective.

CSV columns: :data:`CSV_COLUMNS`; one row per (operation, size). ``nodes`` counts shared-memory domains
(``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)``), so two "hosts" that are network namespaces of one machine
count as two nodes, as Open MPI sees them.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIB = 1 << 20
OPERATIONS = ("allreduce", "pingpong", "reduce_local")
# Measured by `larscale bench-hvd` (scaling.hvdcomm: it needs torch and Horovod), written in the same CSV format:
# one Horovod allreduce (op=Average) of a float32 tensor, the path a training step's gradients take, and the same
# bytes as a group of tensors that Horovod fuses (copied into its fusion buffer and back out).
HOROVOD_OPERATIONS = ("horovod_allreduce", "horovod_allreduce_fused")
CSV_OPERATIONS = OPERATIONS + HOROVOD_OPERATIONS
# Operations whose time is an allreduce's: MPI's (bench-comm) and Horovod's own path (bench-hvd).
ALLREDUCE_OPERATIONS = ("allreduce", *HOROVOD_OPERATIONS)
CSV_COLUMNS = (
    "operation", "ranks", "nodes", "ranks_per_node", "bytes", "elements", "dtype",
    "iterations_per_rep", "repetitions", "mean_s", "median_s", "std_s", "ci95_low_s", "ci95_high_s",
    "min_s", "max_s", "algbw_gbytes_per_s", "busbw_gbytes_per_s", "label", "mpi_library",
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


def message_sizes(min_bytes: int, max_bytes: int, factor: int = 2) -> list[int]:
    """Sizes in bytes from ``min_bytes`` to ``max_bytes`` growing by ``factor``, whole float32 elements."""
    sizes: list[int] = []
    size = max(4, min_bytes - min_bytes % 4)
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    if sizes[-1] != max_bytes - max_bytes % 4:
        sizes.append(max_bytes - max_bytes % 4)
    return sizes


def parse_bytes(text: str) -> int:
    """``"64M"``, ``"1KiB"``, ``"4"`` → bytes (binary multiples: K = 1024)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = (raw[:-1], raw[-1]) if raw and raw[-1] in units else (raw, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"not a byte count: {text!r} (examples: 4, 1K, 64MiB)") from None
    if value < 1 or value != int(value):
        raise ValueError(f"byte count must be a positive whole number, got {text!r}")
    return int(value)


def t_quantile_975(dof: int) -> float:
    """Two-sided 95 % Student-t quantile for ``dof`` degrees of freedom."""
    try:
        from scipy.stats import t
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn in our stack
        return 1.96 + 2.4 / max(dof, 1)   # within 1 % of the exact value for dof >= 3
    return float(t.ppf(0.975, dof))


@dataclass(frozen=True)
class Summary:
    """Statistics of one size's repetition times (seconds)."""

    count: int
    mean: float
    median: float
    std: float
    ci95_low: float
    ci95_high: float
    minimum: float
    maximum: float


def summarize(samples: Sequence[float]) -> Summary:
    """Mean, median, sample standard deviation and the 95 % CI of the mean: mean ± t·s/√k."""
    values = [float(v) for v in samples]
    if len(values) < 2:
        raise ValueError(f"need at least 2 samples for a confidence interval, got {len(values)}")
    mean = statistics.fmean(values)
    std = statistics.stdev(values)
    half = t_quantile_975(len(values) - 1) * std / math.sqrt(len(values))
    return Summary(len(values), mean, statistics.median(values), std, mean - half, mean + half,
                   min(values), max(values))


def bandwidths(operation: str, nbytes: int, seconds: float, ranks: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (10⁹ bytes/s) from the median time; busbw per nccl-tests for allreduce."""
    if seconds <= 0:
        return math.inf, math.inf
    algbw = nbytes / seconds / 1e9
    if operation in ALLREDUCE_OPERATIONS:
        return algbw, algbw * 2 * (ranks - 1) / ranks
    return algbw, algbw   # pingpong: one-way link bandwidth; reduce_local: bytes reduced per second


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


def rows_to_csv(rows: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in row.items()})
    return out.getvalue()


def write_csv(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a table."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    temp.write_text(rows_to_csv(rows))
    temp.replace(target)
    return target


INT_COLUMNS = ("ranks", "nodes", "ranks_per_node", "bytes", "elements", "iterations_per_rep", "repetitions")
TEXT_COLUMNS = ("operation", "dtype", "label", "mpi_library")


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a bench-comm CSV with numbers converted; ValueError names the file and the bad column."""
    source = Path(path)
    if not source.exists():
        raise ValueError(f"bench-comm CSV {str(source)!r} does not exist")
    with source.open(newline="") as handle:
        reader = csv.DictReader(handle)
        present = reader.fieldnames or []
        missing = [c for c in ("operation", "ranks", "nodes", "bytes", "median_s") if c not in present]
        if missing:
            raise ValueError(f"{source}: not a bench-comm CSV (missing column(s) {', '.join(missing)})")
        rows = []
        for line, raw in enumerate(reader, start=2):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                try:
                    if key in TEXT_COLUMNS:
                        row[key] = value
                    elif key in INT_COLUMNS:
                        row[key] = int(value)
                    else:
                        row[key] = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"{source}:{line}: column {key!r} has a bad value {value!r}") from None
            if row["operation"] not in CSV_OPERATIONS:
                raise ValueError(f"{source}:{line}: unknown operation {row['operation']!r}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{source}: bench-comm CSV has no rows")
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """OSU-like text table: one line per (operation, size)."""
    lines = [f"{'operation':<13}{'ranks':>6}{'nodes':>6}{'bytes':>11}{'median us':>12}{'mean us':>12}"
             f"{'ci95 us':>20}{'busbw GB/s':>12}{'reps':>6}{'x':>6}"]
    for r in rows:
        ci = f"{r['ci95_low_s'] * 1e6:.2f}-{r['ci95_high_s'] * 1e6:.2f}"
        lines.append(f"{r['operation']:<13}{r['ranks']:>6}{r['nodes']:>6}{r['bytes']:>11}"
                     f"{r['median_s'] * 1e6:>12.2f}{r['mean_s'] * 1e6:>12.2f}{ci:>20}"
                     f"{r['busbw_gbytes_per_s']:>12.3f}{r['repetitions']:>6}{r['iterations_per_rep']:>6}")
    return "\n".join(lines)
