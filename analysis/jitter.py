"""Step-time jitter measured from the runs' own step logs: what a synchronous step loses waiting for its slowest rank.

Every rank's step time varies from step to step (other processes, the OS, the allocator, data loading). A
synchronous step ends when its slowest rank does, so p ranks take ``E[max of p step times]``, more than the mean:
``σ · E[max of p standard normals]`` more (:func:`analysis.predict.expected_max_normal`). The model takes
``σ = cv · compute`` with ``cv`` the coefficient of variation of one rank's busy time (step − allreduce), read
here from the step logs (:func:`larscale.runformat.read_steps`), each rank on its own (before any maximum over
ranks), warm-up steps excluded.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MIN_STEPS = 3


@dataclass(frozen=True)
class JitterMeasurement:
    cv: float                      # median over the runs' ranks of std/mean of the busy time per step
    ranks_measured: int            # rank logs with at least MIN_STEPS measured steps
    runs: int
    note: str


def rank_step_cvs(run_dir: str | Path, warmup_steps: int | None = None) -> list[float]:
    """Coefficient of variation of each rank's busy time (step_s − allreduce_s) over its measured steps."""
    from larscale.runformat import read_steps

    root = Path(run_dir)
    summary_path = root / "summary.json"
    skip = warmup_steps
    if skip is None:
        skip = int(json.loads(summary_path.read_text()).get("warmup_steps_excluded", 0)) if summary_path.exists() else 0
    out = []
    for path in sorted((root / "steps").glob("rank-*.jsonl")):
        records = sorted(read_steps(path), key=lambda r: r["step"])
        if not records:
            continue
        first = records[0]["step"]
        busy = [r["step_s"] - r.get("allreduce_s", 0.0) for r in records if r["step"] >= first + skip]
        if len(busy) >= MIN_STEPS and statistics.fmean(busy) > 0:
            out.append(statistics.stdev(busy) / statistics.fmean(busy))
    return out


def measured_jitter(run_dirs: Sequence[str | Path], warmup_steps: int | None = None) -> JitterMeasurement | None:
    """The median per-rank coefficient of variation over ``run_dirs`` (None when no rank has enough steps)."""
    cvs: list[float] = []
    runs = 0
    for run_dir in run_dirs:
        try:
            found = rank_step_cvs(run_dir, warmup_steps)
        except (OSError, ValueError, KeyError):
            continue                       # read_runs reports unusable runs; jitter just skips them
        if found:
            runs += 1
            cvs.extend(found)
    if not cvs:
        return None
    cv = statistics.median(cvs)
    note = (f"step-time jitter: median coefficient of variation {cv:.3f} of one rank's busy time over "
            f"{len(cvs)} rank log(s) of {runs} run(s) (range {min(cvs):.3f}-{max(cvs):.3f})")
    return JitterMeasurement(cv=cv if math.isfinite(cv) else 0.0, ranks_measured=len(cvs), runs=runs, note=note)
