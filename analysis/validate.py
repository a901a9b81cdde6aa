"""Predicted vs measured: put a calibrated profile's prediction beside what a real run measured.

The measured iteration time is :func:`analysis.runs.read_run`'s: the mean over measured steps (warm-up
excluded) of the slowest rank's step time, because a synchronous step ends when its slowest rank does and a
time-to-train is the sum of the steps (the median is kept beside it). The prediction is
:func:`analysis.predict.predict` for the run's own model, image size, placement (nodes × ranks per node) and
global batch, so the comparison checks the model, not a fit of the run itself.

On a shared machine a point can be off because the machine changed, not the model: :func:`diagnose` puts the
evidence beside each point — the load average while it ran (:class:`LoadTrace`, sampled by the caller) against
the calibration's, and for a point that the calibration repeated exactly (a 1-rank run alone), the repeat's
step time — and says which explains an error over the tolerance.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.predict import predict
from analysis.runs import read_run, workload_key
from larscale.machine import MachineProfile


def compare_run(run_dir: str | Path, profile: MachineProfile) -> dict[str, Any]:
    """One row: the run's configuration, the prediction's breakdown, the measurement and the relative error."""
    measured = read_run(run_dir)
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    nodes = int(summary.get("nodes") or 1)
    ranks_per_node = int(summary.get("ranks_per_node") or measured.ranks // nodes)
    # At the run's own input size: the prediction then reads the calibration's measured images/s for this
    # exact network and size (key model@size), never another size's.
    predicted = predict(measured.model, profile, nodes=nodes, global_batch=measured.ranks * measured.batch_per_rank,
                        ranks_per_node=ranks_per_node, epochs=1, image_size=measured.image_size).record(0)
    return {
        "run": Path(run_dir).name,
        "model": workload_key(measured.model, measured.image_size),
        "ranks": measured.ranks,
        "nodes": nodes,
        "batch_per_rank": measured.batch_per_rank,
        "global_batch": measured.ranks * measured.batch_per_rank,
        "predicted_s": predicted["iteration_s"],
        "predicted_compute_s": predicted["compute_s"],
        "predicted_comm_s": predicted["comm_total_s"],
        "predicted_comm_exposed_s": predicted["comm_exposed_s"],
        "measured_s": measured.step_s_mean,
        "measured_median_s": measured.step_s,
        "measured_busy_s": measured.busy_s,
        "measured_allreduce_s": measured.allreduce_s,
        "measured_compute_s": measured.compute_s,
        "steps_measured": measured.steps_measured,
        "started_at": measured.started_at,
        "finished_at": measured.finished_at,
        "error": predicted["iteration_s"] / measured.step_s_mean - 1.0,
    }


def compare_runs(run_dirs: Iterable[str | Path], profile: MachineProfile) -> list[dict[str, Any]]:
    return [compare_run(run_dir, profile) for run_dir in run_dirs]


@dataclass
class LoadTrace:
    """The 1-minute load average sampled over time (seconds since the epoch, load): what else ran."""

    samples: list[tuple[float, float]] = field(default_factory=list)

    def add(self, when: float, load: float) -> None:
        self.samples.append((when, load))

    def mean(self, start: str | None, end: str | None, reach_s: float = 30.0) -> float:
        """Mean load over an ISO-8601 [start, end] window: the samples inside it, else the nearest one within
        ``reach_s`` of it; NaN when the trace did not cover that time (a point measured by an earlier run)."""
        if not self.samples or not start or not end:
            return math.nan
        t0, t1 = (_dt.datetime.fromisoformat(t).timestamp() for t in (start, end))
        inside = [load for when, load in self.samples if t0 <= when <= t1]
        if inside:
            return statistics.fmean(inside)
        near = [(min(abs(when - t0), abs(when - t1)), load) for when, load in self.samples
                if t0 - reach_s <= when <= t1 + reach_s]
        return min(near)[1] if near else math.nan

    def write(self, path: Path) -> None:
        """CSV ``time,load1`` (so that a rerun that reuses measured points still has their evidence)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("time,load1\n" + "".join(f"{when:.3f},{load:.2f}\n" for when, load in sorted(self.samples)))

    @classmethod
    def read(cls, path: Path) -> LoadTrace:
        trace = cls()
        if path.exists():
            for line in path.read_text().splitlines()[1:]:
                try:
                    when, load = (float(x) for x in line.split(","))
                except ValueError:
                    continue                  # a torn last line of an interrupted run
                trace.add(when, load)
        return trace


@dataclass(frozen=True)
class Repeat:
    """A calibration run that repeated a measured point's exact configuration (model, size, batch, 1 rank)."""

    key: tuple[str, int]                 # (workload key, batch per rank)
    step_s: float
    started_at: str | None
    finished_at: str | None


def diagnose(rows: list[dict[str, Any]], trace: LoadTrace, cores: int, calibration_load: float,
             repeats: Iterable[Repeat] = (), tolerance: float = 0.20) -> list[dict[str, Any]]:
    """Each row of :func:`compare_runs` with ``load_avg`` (during the point), ``repeat_s`` (the calibration's
    repeat of the point, if any, and ``drift``: the point's step ÷ the repeat's − 1) and ``verdict``.

    A point outside ``tolerance`` is put down to the machine when the evidence says so: other processes ran
    beside it (the load average while it ran exceeded its own ranks by a core's worth or more) or beside the
    calibration (``calibration_load`` above the two runs a calibration step runs at most, by as much), or its
    exact repeat took a different time by more than the tolerance (the same run, another time: drift, not the
    model). How an oversubscribed CPU is shared depends on each job's processes and threads, so a loaded point
    is not comparable with a loaded calibration either. Otherwise the verdict says the model missed it.
    """
    by_key = {}
    for repeat in repeats:
        by_key.setdefault(repeat.key, []).append(repeat)
    out = []
    for row in rows:
        load = trace.mean(row.get("started_at"), row.get("finished_at"))
        same = by_key.get((row["model"], row["batch_per_rank"])) if row["ranks"] == 1 else None
        repeat_s = statistics.fmean(r.step_s for r in same) if same else math.nan
        drift = row["measured_s"] / repeat_s - 1.0 if same else math.nan
        error = row["error"]
        reasons = []
        own = min(row["ranks"], cores)
        if math.isfinite(load) and load > own + 1.0:
            reasons.append(f"load average {load:.1f} on {cores} cores while it ran ({own} of it its own ranks): "
                           "other processes took CPU time")
        if math.isfinite(calibration_load) and calibration_load > min(2, cores) + 1.0:
            reasons.append(f"the calibration ran at load average {calibration_load:.1f} on {cores} cores")
        if same and abs(drift) > tolerance:
            reasons.append(f"the same run repeated at calibration took {repeat_s:.3f} s a step against "
                           f"{row['measured_s']:.3f} s here ({drift:+.0%}): the machine, not the model")
        if abs(error) <= tolerance:
            verdict = f"within {tolerance:.0%}"
        elif reasons:
            verdict = "machine noise: " + "; ".join(reasons)
        else:
            seen = f"load {load:.1f}" if math.isfinite(load) else "load not sampled"
            verdict = (f"model error: {error:+.0%} with the machine as calibrated ({seen}"
                       + (f", repeat {drift:+.0%}" if same else "") + ")")
        out.append({**row, "load_avg": load, "repeat_s": repeat_s, "drift": drift, "verdict": verdict})
    return out
