"""Training run directories read into robust per-step numbers (``scaling/`` schema: ``summary.json`` +
``steps/rank-*.jsonl``): what calibration, validation, the demo and ``larscale report`` measure runs with.

Per run, over the measured steps (warm-up excluded as the summary says), each step counts at its slowest rank
(a synchronous step waits for it) and the run's figures are medians over those steps (:func:`read_run`).

Runs of one workload that ran side by side on the same host (one 1-rank run per device, so that each is
measured with its neighbours busy) can be combined step by step, the slowest per step: a synchronous step waits
for its slowest rank (:func:`pace_side_by_side`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.fitting import CalibrationError


def workload_key(model: str, image_size: int | None) -> str:
    """Key of ``compute.measured_images_per_s`` (:func:`analysis.compute.measured_key`, where predictions read it)."""
    from analysis.compute import measured_key

    return measured_key(model, image_size)


@dataclass(frozen=True)
class RunMeasurement:
    """One training run's measured steps (warm-up excluded), reduced to robust per-step numbers."""

    path: str
    model: str
    image_size: int | None
    ranks: int
    batch_per_rank: int
    threads_per_rank: int | None
    steps_measured: int
    step_s: float                 # median over steps of the slowest rank's step_s
    step_s_mean: float
    busy_s: float                 # median over steps of the slowest rank's step_s − allreduce_s
    allreduce_s: float            # median over steps of the slowest rank's allreduce_s
    compute_s: float
    optimizer_s: float
    data_s: float
    # Where and when it ran, and its measured steps (the slowest rank's times, :data:`STEP_TIMES`): what
    # :func:`pace_side_by_side` needs. Empty for a measurement built by hand.
    hosts: tuple[str, ...] = ()
    started_at: str | None = None
    finished_at: str | None = None
    steps: tuple[dict[str, float], ...] = field(default=(), repr=False, compare=False)
    # What the trainer saw (summary backend.allreduce_overlap): "layerwise", "none" (a compiled backward
    # handed every gradient over at its end) or None (not recorded).
    allreduce_overlap: str | None = None
    # Runs combined into this measurement by pace_side_by_side (1: it ran on its own or is one run).
    side_by_side: int = 1
    precision: str | None = None  # the run's --precision (None: built by hand)

    @property
    def images_per_s(self) -> float:
        """One rank's throughput without communication: b / (step − allreduce)."""
        return self.batch_per_rank / self.busy_s


# Per measured step, each the slowest rank's: busy_s is step_s − allreduce_s (the step without communication).
STEP_TIMES = ("step_s", "busy_s", "allreduce_s", "compute_s", "optimizer_s", "data_s")


def _slowest_per_step(sources: Sequence[Sequence[dict[str, Any]]], time_of=lambda step, name: step[name]
                      ) -> tuple[dict[str, float], ...]:
    """Step by step (paired by position; the shortest source sets the count), each of :data:`STEP_TIMES` at its
    maximum over the sources (the ranks of a run, or runs that ran side by side)."""
    count = min(len(source) for source in sources)
    return tuple({name: max(time_of(source[k], name) for source in sources) for name in STEP_TIMES}
                 for k in range(count))


def _step_log_time(record: dict[str, Any], name: str) -> float:
    """One of :data:`STEP_TIMES` from a step-log record (which has no busy_s)."""
    return record["step_s"] - record["allreduce_s"] if name == "busy_s" else record[name]


def _with_steps(run: RunMeasurement, steps: tuple[dict[str, float], ...], **changes: Any) -> RunMeasurement:
    """``run`` with its step statistics recomputed from ``steps`` (medians; the step's mean too)."""
    def median(name: str) -> float:
        return statistics.median(s[name] for s in steps)

    return dataclasses.replace(
        run, steps=steps, steps_measured=len(steps), step_s=median("step_s"),
        step_s_mean=statistics.fmean(s["step_s"] for s in steps), busy_s=median("busy_s"),
        allreduce_s=median("allreduce_s"), compute_s=median("compute_s"), optimizer_s=median("optimizer_s"),
        data_s=median("data_s"), **changes)


def pace_side_by_side(runs: Sequence[RunMeasurement]) -> tuple[list[RunMeasurement], list[str]]:
    """Runs of one workload that ran side by side on the same host(s) become one measurement, paced by the slowest.

    Calibration runs one 1-rank run per device at once so that each device is measured with its neighbours
    busy, as in a multi-rank run. But a synchronous data-parallel step ends when its slowest rank ends, and the
    devices of a node need not be equal (two cores of one VM ran side-by-side ResNet-50 steps in 0.25-0.27 s
    and 0.35-0.40 s, and the 2-rank run followed the slower one): the mean of the two rates predicts a rank
    nobody waits for. So runs with the same model, image size, per-rank batch, ranks and threads, the same
    hosts, and overlapping start-finish times are combined step by step (paired by position, the first
    measured steps together; the shorter run sets the count): each step time is the maximum over the runs.
    Runs without hosts, times or steps are left as they are. Returns the runs and one note per combination.
    """
    def key(run: RunMeasurement) -> tuple:
        return (run.model, run.image_size, run.batch_per_rank, run.ranks, run.threads_per_rank, run.hosts)

    def span(run: RunMeasurement) -> tuple[_dt.datetime, _dt.datetime]:
        return _dt.datetime.fromisoformat(run.started_at), _dt.datetime.fromisoformat(run.finished_at)

    eligible = [r for r in runs if r.hosts and r.started_at and r.finished_at and r.steps]
    groups: list[list[RunMeasurement]] = []
    for run in sorted(eligible, key=lambda r: (repr(key(r)), span(r)[0])):
        last = groups[-1] if groups else None
        if last and key(last[0]) == key(run) and span(run)[0] < max(span(r)[1] for r in last):
            last.append(run)
        else:
            groups.append([run])
    combined = {id(group[0]): group for group in groups if len(group) > 1}
    grouped = {id(r) for group in combined.values() for r in group}
    out: list[RunMeasurement] = []
    notes: list[str] = []
    for run in runs:
        if id(run) in combined:
            group = combined[id(run)]
            steps = _slowest_per_step([r.steps for r in group])
            paths = " + ".join(r.path for r in group)
            out.append(_with_steps(run, steps, path=paths, started_at=min(r.started_at for r in group),
                                   finished_at=max(r.finished_at for r in group), side_by_side=len(group)))
            rates = ", ".join(f"{r.images_per_s:.3g}" for r in group)
            notes.append(f"{len(group)} runs of {workload_key(run.model, run.image_size)} at b={run.batch_per_rank} "
                         f"ran side by side on {','.join(run.hosts)} ({paths}): combined step by step, the slowest "
                         f"per step (a synchronous step waits for its slowest rank): {out[-1].images_per_s:.3g} "
                         f"images/s, the runs alone {rates}")
        elif id(run) not in grouped:
            out.append(run)
    return out, notes


def runs_alone(runs: Sequence[RunMeasurement]) -> list[RunMeasurement]:
    """The runs that overlapped no other run in time (start-finish), whatever the workload: each had its node to
    itself, apart from what else the machine ran. Runs without times are never alone (unknown)."""
    def span(run: RunMeasurement) -> tuple[_dt.datetime, _dt.datetime] | None:
        if not (run.started_at and run.finished_at):
            return None
        return _dt.datetime.fromisoformat(run.started_at), _dt.datetime.fromisoformat(run.finished_at)

    spans = [span(r) for r in runs]
    alone = []
    for i, (run, own) in enumerate(zip(runs, spans, strict=True)):
        if own is None:
            continue
        if all(other is None or other[1] <= own[0] or own[1] <= other[0]
               for j, other in enumerate(spans) if j != i):
            alone.append(run)
    return alone


def partial_node_speedup(side_by_side: Sequence[RunMeasurement], alone: Sequence[RunMeasurement]
                         ) -> tuple[float | None, list[str]]:
    """How much faster a device runs alone than beside its busy neighbours: the geometric mean, over the
    workloads and batches measured both ways, of (side-by-side step time / alone step time); None when no
    workload was measured both ways. Notes name each pair."""
    loaded = {(r.model, r.image_size, r.batch_per_rank): r for r in side_by_side if r.side_by_side > 1}
    ratios, notes = [], []
    for run in alone:
        other = loaded.get((run.model, run.image_size, run.batch_per_rank))
        if other is None:
            continue
        ratios.append(other.busy_s / run.busy_s)
        notes.append(f"{workload_key(run.model, run.image_size)} b={run.batch_per_rank}: {run.busy_s:.4g} s a step "
                     f"alone, {other.busy_s:.4g} s side by side ({ratios[-1]:.3g}x)")
    if not ratios:
        return None, notes
    factor = math.exp(statistics.fmean(math.log(x) for x in ratios))
    notes.append(f"partial_node_speedup {factor:.3g} (geometric mean of {len(ratios)}): a node's devices run this "
                 "much faster when the others idle")
    return factor, notes


@dataclass(frozen=True)
class InputProblem:
    """Something in the inputs that calibrate skipped: one step-log line, or a whole run directory."""

    path: str
    line: int | None
    reason: str
    what: str                     # "line skipped" | "run skipped" | "steps missing"

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.reason} ({self.what})"


def read_run(run_dir: str | Path, warmup_steps: int | None = None,
             problems: list[InputProblem] | None = None) -> RunMeasurement:
    """Summary + step logs of a run directory (``scaling/`` schema); ValueError names what is wrong.

    Without ``problems`` the first malformed step-log line is an error (file:line); with a list, each malformed
    line is appended to it and skipped. Ranks are paired by step number, so a skipped line never pairs one
    rank's step k with another rank's step k + 1.
    """
    from larscale.runformat import validate_step, validate_summary

    root = Path(run_dir)
    summary_path = root / "summary.json"
    if not summary_path.exists():
        raise CalibrationError(f"{root}: no summary.json (not a larscale run directory)")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{summary_path}:{err.lineno}: not JSON ({err.msg})") from None
    try:
        validate_summary(summary)
    except ValueError as err:
        raise CalibrationError(f"{summary_path}: {err}") from None
    files = sorted((root / "steps").glob("rank-*.jsonl"))
    if not files:
        raise CalibrationError(f"{root}: no steps/rank-*.jsonl step logs")
    by_rank: list[dict[int, dict[str, Any]]] = []
    for path in files:
        records = {}
        lines = path.read_text(errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = validate_step(json.loads(line))
            except json.JSONDecodeError as err:
                reason = f"not JSON ({err.msg}{'; a torn last line' if number == len(lines) else ''})"
            except ValueError as err:
                reason = str(err)
            else:
                records[record["step"]] = record
                continue
            if problems is None:
                raise CalibrationError(f"{path}:{number}: {reason}")
            problems.append(InputProblem(str(path), number, reason, "line skipped"))
        # A complete run logs every step once per rank: fewer is a log cut at a line boundary (no bad line).
        if problems is not None and summary.get("status") == "complete" and len(records) != summary["steps_done"]:
            problems.append(InputProblem(str(path), None, f"{len(records)} valid step record(s), the summary says "
                                         f"{summary['steps_done']} step(s) done (truncated or damaged log)",
                                         "steps missing"))
        by_rank.append(records)
    common = sorted(set.intersection(*(set(records) for records in by_rank)))
    per_rank = [[records[s] for s in common] for records in by_rank]
    skip = summary.get("warmup_steps_excluded", 0) if warmup_steps is None else warmup_steps
    first_step = common[0] if common else 0
    per_rank = [[r for r in records if r["step"] >= first_step + skip] for records in per_rank]
    if min(len(r) for r in per_rank) < 1:
        raise CalibrationError(f"{root}: no steps left after excluding {skip} warm-up step(s)")
    config = summary.get("config") or {}
    blank = RunMeasurement(
        path=str(root), model=str(summary["model"]), image_size=config.get("image_size"),
        ranks=int(summary["ranks"]), batch_per_rank=int(summary["batch_per_rank"]),
        threads_per_rank=summary.get("threads_per_rank"), steps_measured=0, step_s=math.nan, step_s_mean=math.nan,
        busy_s=math.nan, allreduce_s=math.nan, compute_s=math.nan, optimizer_s=math.nan, data_s=math.nan,
        hosts=tuple(sorted(str(h) for h in summary.get("hosts") or ())), started_at=summary.get("started_at"),
        finished_at=summary.get("finished_at"),
        allreduce_overlap=(summary.get("backend") or {}).get("allreduce_overlap"), precision=summary.get("precision"))
    return _with_steps(blank, _slowest_per_step(per_rank, _step_log_time))


def read_runs(run_dirs: Sequence[str | Path], warmup_steps: int | None = None
              ) -> tuple[list[RunMeasurement], list[InputProblem]]:
    """Every usable run of ``run_dirs``, and what was skipped: malformed lines (file:line) and runs that cannot
    be used at all (no or broken summary, no step logs, no measured step). Nothing is dropped unreported."""
    runs: list[RunMeasurement] = []
    problems: list[InputProblem] = []
    for run_dir in run_dirs:
        try:
            runs.append(read_run(run_dir, warmup_steps, problems))
        except CalibrationError as err:
            problems.append(InputProblem(str(run_dir), None, str(err), "run skipped"))
    return runs, problems

