"""The benchmark CSV that `larscale bench-comm` / `bench-hvd` write and `larscale calibrate` reads.

One row per (operation, size): the statistics of the repetition times of one message size (each repetition the
slowest rank's time), and the nccl-tests bandwidths of the median: ``algbw = n / t`` and, for an allreduce,
``busbw = algbw · 2(p−1)/p`` (the link's bytes/s when a bandwidth-optimal allreduce runs at link speed, whatever
p). The harness that measures lives in :mod:`scaling.benchcomm` (it runs under MPI); the fitting in
:mod:`analysis.fit_comm`. Pure Python and numpy-free, like the run format beside it.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from larscale.runformat import t_quantile_975

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
    "min_s", "max_s", "algbw_gbytes_per_s", "busbw_gbytes_per_s", "label", "mpi_library", "device",
)


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
# device: where the buffers lived (cpu, cuda); empty in rows written before the column existed or imported.
TEXT_COLUMNS = ("operation", "dtype", "label", "mpi_library", "device")


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
