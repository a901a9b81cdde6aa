"""Import other tools' allreduce measurements into the benchmark CSV (larscale/benchformat.py) that
`larscale calibrate --bench` reads: NVIDIA nccl-tests' ``all_reduce_perf`` (NCCL, RCCL's rccl-tests print the same
table) and the OSU Micro-Benchmarks' ``osu_allreduce``.

nccl-tests prints one row per size: ``size count type redop root time algbw busbw #wrong`` for the out-of-place
and again for the in-place run (older releases lack ``redop``/``root``: the header line says which), times in
µs averaged over ``iters`` iterations, bandwidths in GB/s; ranks and hosts come from its ``#  Rank N ... on HOST``
lines when it printed them. The out-of-place columns are imported (the path a gradient buffer takes), with the
tool's own algbw/busbw. OSU prints ``# Size  Avg Latency(us)`` (with ``-f`` also Min, Max and Iterations) under a
``# OSU MPI[-CUDA] <Collective> Latency Test`` line; it does not print the rank count, which the caller gives.
Every row is an ``allreduce`` row: what calibration fits α and β on.
"""

from __future__ import annotations

import re
from typing import Any

from larscale.benchformat import bandwidths

DTYPES = {"float": ("float32", 4), "half": ("float16", 2), "bfloat16": ("bfloat16", 2), "double": ("float64", 8),
          "int32": ("int32", 4), "int8": ("int8", 1), "MPI_FLOAT": ("float32", 4), "MPI_CHAR": ("int8", 1),
          "MPI_DOUBLE": ("float64", 8), "MPI_INT": ("int32", 4)}


class BenchImportError(ValueError):
    """The text is not the expected tool's output (the reason names what is missing)."""


def _row(nbytes: int, elements: int, dtype: str, seconds: float, ranks: int, nodes: int, iterations: int,
         label: str, library: str, algbw: float | None = None, busbw: float | None = None,
         minimum: float | None = None, maximum: float | None = None) -> dict[str, Any]:
    own_algbw, own_busbw = bandwidths("allreduce", nbytes, seconds, ranks)
    return {"operation": "allreduce", "ranks": ranks, "nodes": nodes, "ranks_per_node": max(1, ranks // nodes),
            "bytes": nbytes, "elements": elements, "dtype": dtype, "iterations_per_rep": iterations,
            "repetitions": 1, "mean_s": seconds, "median_s": seconds, "std_s": 0.0, "ci95_low_s": seconds,
            "ci95_high_s": seconds, "min_s": minimum if minimum is not None else seconds,
            "max_s": maximum if maximum is not None else seconds,
            "algbw_gbytes_per_s": algbw if algbw is not None else own_algbw,
            "busbw_gbytes_per_s": busbw if busbw is not None else own_busbw, "label": label, "mpi_library": library}


def parse_nccl_tests(text: str, ranks: int | None = None, nodes: int | None = None,
                     library: str = "nccl") -> list[dict[str, Any]]:
    """Rows of an ``all_reduce_perf`` log. ``ranks``/``nodes``: when the log has no ``Rank`` lines (or to check)."""
    header = next((line for line in text.splitlines() if line.startswith("#") and "size" in line
                   and "count" in line and "busbw" in line), None)
    if header is None:
        raise BenchImportError("no nccl-tests table header ('# size count type ... busbw') in the text")
    names = header.lstrip("#").split()
    per_run = names.index("busbw") + 2 - names.index("time")       # time algbw busbw #wrong|error
    hosts = re.findall(r"^#\s+Rank\s+\d+\s.*?\bon\s+(\S+)\s+device", text, flags=re.MULTILINE)
    gpus = re.search(r"nGpus (\d+)", text)
    found_ranks = len(hosts) * (int(gpus.group(1)) if gpus and hosts else 1) if hosts else None
    if ranks is None:
        ranks = found_ranks
    elif found_ranks is not None and found_ranks != ranks:
        raise BenchImportError(f"the log shows {found_ranks} ranks, not {ranks}")
    if ranks is None:
        raise BenchImportError("the log has no '#  Rank' lines: give the rank count (--ranks)")
    nodes = nodes or (len(set(hosts)) if hosts else 1)
    iters = re.search(r"(?<!warmup )(?<!agg )\biters:\s*(\d+)", text)      # not "warmup iters" / "agg iters"
    iterations = int(iters.group(1)) if iters else 1
    rows = []
    for line in text.splitlines():
        words = line.split()
        if line.startswith("#") or len(words) < names.index("time") + per_run or not words[0].isdigit():
            continue
        at = {name: words[i] for i, name in enumerate(names[:names.index("time") + per_run])}
        dtype, width = DTYPES.get(at["type"], (at["type"], 0))
        seconds = float(at["time"]) * 1e-6
        rows.append(_row(int(at["size"]), int(at["count"]), dtype, seconds, ranks, nodes, iterations,
                         "nccl-tests all_reduce_perf out-of-place", library, algbw=float(at["algbw"]),
                         busbw=float(at["busbw"])))
    if not rows:
        raise BenchImportError("the nccl-tests table has no rows")
    return rows


def parse_osu(text: str, ranks: int, nodes: int = 1, library: str = "mpi") -> list[dict[str, Any]]:
    """Rows of an ``osu_allreduce`` log (the rank count is the caller's: OSU does not print it)."""
    title = re.search(r"^# OSU MPI\S* (\w+) Latency Test", text, flags=re.MULTILINE)
    if title is None:
        raise BenchImportError("no '# OSU MPI ... Latency Test' line: not OSU Micro-Benchmarks output")
    if title.group(1) != "Allreduce":
        raise BenchImportError(f"this is the OSU {title.group(1)} test, not osu_allreduce")
    if ranks < 2:
        raise BenchImportError(f"an allreduce needs at least 2 ranks, got {ranks}")
    header = next((line for line in text.splitlines() if line.startswith("# Size")), None)
    if header is None:
        raise BenchImportError("no '# Size  Avg Latency(us)' header")
    columns = re.findall(r"(Size|Avg Latency|Min Latency|Max Latency|Iterations)", header)
    datatype = re.search(r"# Datatype: (\w+)", text)
    dtype, width = DTYPES.get(datatype.group(1), ("int8", 1)) if datatype else ("int8", 1)
    rows = []
    for line in text.splitlines():
        words = line.split()
        if line.startswith("#") or len(words) != len(columns) or not words[0].isdigit():
            continue
        at = dict(zip(columns, words, strict=True))
        nbytes = int(at["Size"])
        micro = {k: float(at[k]) * 1e-6 for k in ("Avg Latency", "Min Latency", "Max Latency") if k in at}
        rows.append(_row(nbytes, nbytes // width, dtype, micro["Avg Latency"], ranks, nodes,
                         int(at.get("Iterations", 1)), "osu_allreduce", library, minimum=micro.get("Min Latency"),
                         maximum=micro.get("Max Latency")))
    if not rows:
        raise BenchImportError("the OSU table has no rows")
    return rows
