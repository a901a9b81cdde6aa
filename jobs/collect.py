"""Gather every run of a sweep into one table (CSV and Parquet), listing what failed or is missing and why.

For each point of the manifest: the point's parameters, the run's summary (``summary.json``: status,
throughput with its 95 % interval, mean phase times) and its per-rank step logs (``steps/rank-*.jsonl``:
number of steps logged, the median step time of the slowest rank) and its attempts (launches, retries,
requeues, time lost to failures: jobs/attempts.py). Files are checked with
``larscale.runformat.validate_summary`` / ``validate_step``; a malformed line is reported with its file and line
number and counted, never dropped silently. The table has one row per point, also for failed and missing
points (their measurements are empty), so ``len(table) == len(manifest.points)``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.manifest import load_manifest
from jobs.submit import refresh

try:  # pure python, no torch: see larscale/runformat.py
    from larscale.runformat import validate_step, validate_summary
except ImportError:  # pragma: no cover - the trainer package is part of this repository
    def validate_step(record):  # type: ignore[no-redef]
        if not isinstance(record, dict):
            raise ValueError("step record must be an object")
        return record

    def validate_summary(summary):  # type: ignore[no-redef]
        if not isinstance(summary, dict) or "status" not in summary:
            raise ValueError("summary must be an object with a status")
        return summary


@dataclass(frozen=True)
class Problem:
    point_id: str
    kind: str          # "failed" | "missing" | "interrupted" | "malformed" | "pending" | "refused"
    reason: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = f" [{self.file}" + (f":{self.line}" if self.line is not None else "") + "]" if self.file else ""
        return f"{self.point_id}: {self.kind}: {self.reason}{where}"


@dataclass
class CollectResult:
    table: Any                                    # pandas.DataFrame, one row per point
    problems: list[Problem] = field(default_factory=list)
    csv_path: Path | None = None
    parquet_path: Path | None = None

    @property
    def malformed(self) -> int:
        return sum(1 for p in self.problems if p.kind == "malformed")

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_steps(path: Path, point_id: str, problems: list[Problem]) -> list[dict]:
    records = []
    with open(path, errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                records.append(dict(validate_step(json.loads(line))))
            except (json.JSONDecodeError, ValueError, TypeError) as err:
                problems.append(Problem(point_id, "malformed", str(err), str(path), number))
    return records


def _row_from_run(point_id: str, run_dir: Path, problems: list[Problem]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    summary_path = run_dir / "summary.json"
    summary = None
    if summary_path.exists():
        try:
            summary = dict(validate_summary(json.loads(summary_path.read_text())))
        except json.JSONDecodeError as err:
            problems.append(Problem(point_id, "malformed", f"not valid JSON: {err.msg}", str(summary_path),
                                    err.lineno))
            summary = None
        except (ValueError, TypeError) as err:
            problems.append(Problem(point_id, "malformed", str(err), str(summary_path)))
            summary = None
        if summary is not None:
            throughput = summary.get("throughput") or {}
            times = summary.get("times") or {}
            row.update({
                "status": summary.get("status"), "steps_done": summary.get("steps_done"),
                "steps_planned": summary.get("steps_planned"),
                "measured_ranks": summary.get("ranks"), "measured_global_batch": summary.get("global_batch"),
                "images_per_s": throughput.get("images_per_s"), "ci95_low": throughput.get("ci95_low"),
                "ci95_high": throughput.get("ci95_high"),
                **{f"mean_{k}": times.get(k) for k in ("step_s", "data_s", "compute_s", "allreduce_s",
                                                       "optimizer_s")},
                "controller": summary.get("controller"), "device": summary.get("device"),
                "hosts": ",".join(summary.get("hosts") or []),
                "top1": (summary.get("eval") or {}).get("top1"), "checkpoint": summary.get("checkpoint"),
                "started_at": summary.get("started_at"), "finished_at": summary.get("finished_at")})
    step_files = sorted((run_dir / "steps").glob("rank-*.jsonl")) if (run_dir / "steps").is_dir() else []
    by_step: dict[int, float] = {}
    logged = 0
    for path in step_files:
        records = _read_steps(path, point_id, problems)
        for rec in records:
            logged += 1
            # The slowest rank sets the pace of a synchronous step.
            by_step[rec["step"]] = max(by_step.get(rec["step"], 0.0), float(rec["step_s"]))
        # A complete run logs each step once per rank (a resume drops the redone steps first): fewer records
        # is a log cut at a line boundary, which no line check can see.
        if summary is not None and summary.get("status") == "complete" and \
                len({r["step"] for r in records}) != summary.get("steps_done"):
            problems.append(Problem(point_id, "malformed", f"{len({r['step'] for r in records})} valid step "
                                    f"record(s), the summary says {summary.get('steps_done')} step(s) done "
                                    "(truncated or damaged log)", str(path)))
    if summary is not None and summary.get("status") == "complete" and len(step_files) != summary.get("ranks"):
        problems.append(Problem(point_id, "malformed", f"{len(step_files)} step log(s) for "
                                f"{summary.get('ranks')} rank(s)", str(run_dir / "steps")))
    row["step_files"] = len(step_files)
    row["step_records"] = logged
    row["median_step_s"] = statistics.median(by_step.values()) if by_step else None
    return row


def collect(output_dir: str | Path, write: bool = True, refresh_states: bool = True) -> CollectResult:
    """Read every run of the sweep in ``output_dir`` into one pandas table; write results.csv/.parquet."""
    import pandas as pd

    manifest = load_manifest(output_dir)
    if refresh_states:
        manifest = refresh(manifest)
    problems: list[Problem] = []
    rows = []
    for point_id, rec in manifest.points.items():
        started = [a for a in rec.attempts if a.number is not None]
        row: dict[str, Any] = {**rec.params, "state": rec.state, "job_id": rec.job_id,
                               "exit_status": rec.exit_status, "run_dir": rec.run_dir,
                               # launches of the trainer: retries inside an allocation, requeued jobs, and the
                               # wall time their failures cost (jobs/attempts.py)
                               "attempts": len(started), "retries": sum(a.cause == "retry" for a in started),
                               "requeues": sum(a.cause == "requeue" for a in started),
                               "time_lost_s": sum(a.time_lost_s or 0.0 for a in started)}
        run_dir = Path(rec.run_dir)
        if run_dir.exists():
            row.update(_row_from_run(point_id, run_dir, problems))
        if rec.state == "complete":
            if row.get("images_per_s") is None and not any(p.point_id == point_id for p in problems):
                why = ("complete but the summary has no throughput" if (run_dir / "summary.json").exists()
                       else "complete but summary.json is missing (empty or deleted run directory)")
                problems.append(Problem(point_id, "malformed", why, str(run_dir / "summary.json")))
        elif rec.state in ("failed", "missing", "interrupted", "refused"):
            problems.append(Problem(point_id, rec.state, rec.reason or rec.state))
        elif not run_dir.exists() or rec.state in ("planned", "submitted", "pending", "running"):
            problems.append(Problem(point_id, "pending" if rec.job_id else "missing",
                                    f"state {rec.state}" + (f" ({rec.reason})" if rec.reason else "")))
        row["model"], row["framework"] = manifest.spec.get("model"), manifest.spec.get("framework")
        row["sweep"], row["kind"] = manifest.name, manifest.spec.get("sweep", {}).get("kind")
        rows.append(row)
    table = pd.DataFrame(rows)
    result = CollectResult(table=table, problems=problems)
    if write:
        out = Path(manifest.output_dir)
        result.csv_path, result.parquet_path = out / "results.csv", out / "results.parquet"
        table.to_csv(result.csv_path, index=False)
        table.to_parquet(result.parquet_path, index=False)
    return result
