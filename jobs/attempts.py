"""A point's attempts: what the job script recorded about each launch of the trainer, turned into the manifest.

The script (jobs/scripts.py) appends two JSON lines per launch to ``status/<point>.attempts.jsonl``::

    {"event": "start", "attempt": 2, "job": "4242", "mode": "resume", "requeue": false, "time": 1796066540.1}
    {"event": "end", "attempt": 2, "job": "4242", "exit": 1, "steps": 147, "checkpoint": 140,
     "checkpoint_time": 1796066551, "time": 1796066553.4, "why": ""}

``attempt`` numbers the point's launches over the whole sweep directory (retries inside an allocation, requeued
jobs, resubmissions); ``steps`` is how many steps the furthest rank had logged when the launch ended (the step
reached), ``checkpoint`` the newest checkpoint's step then (where the next launch resumes; -1 none) and
``checkpoint_time`` its modification time; ``why`` is set when the script stopped retrying. A start without an
end is a launch cut off with its job (killed at the walltime, a node failure, a requeue without a grace period)
or one still running.

Time lost by a failed launch (``time_lost_s``): the wall time between the newest checkpoint written during it
(or its start, when it wrote none) and the moment the script saw it fail. Those steps are computed again by the
next launch, and detecting the failure is part of the loss; the back-off and the next launch's start-up are the
restart overhead, visible as the gap to the next attempt's ``started_at``. A complete or walltime-stopped
launch (exit 0 or 75) loses nothing: it checkpointed where it stopped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from jobs.manifest import Attempt, PointRecord

# The characters the script keeps in a job id (others become "_"): the manifest's ids are compared the same way.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def job_key(job_id: str | None) -> str:
    return _UNSAFE.sub("_", job_id or "")


def records_path(output_dir: str | Path, point_id: str) -> Path:
    return Path(output_dir) / "status" / f"{point_id}.attempts.jsonl"


@dataclass(frozen=True)
class Launch:
    """One launch as the script recorded it (start and, once it ended, end)."""

    attempt: int
    job: str
    resume: bool
    requeue: bool
    start: float
    end: float | None = None
    exit_status: int | None = None
    steps: int | None = None
    checkpoint: int | None = None
    checkpoint_time: float | None = None
    why: str | None = None

    @property
    def time_lost_s(self) -> float | None:
        """See the module docstring; None while running or when the launch was cut off without an end."""
        if self.end is None or self.exit_status is None:
            return None
        if self.exit_status in (0, 75):
            return 0.0
        since = self.start
        if self.checkpoint_time and self.checkpoint_time > since:
            since = self.checkpoint_time
        return round(max(0.0, self.end - since), 1)


def read_launches(path: str | Path) -> list[Launch]:
    """The launches recorded in one point's file, by attempt number. Unreadable lines (a line torn by a crash
    mid-write) are skipped: the file is the script's diary, the run directory keeps the results."""
    starts: dict[int, dict] = {}
    ends: dict[int, dict] = {}
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
            number = int(record["attempt"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        (starts if record.get("event") == "start" else ends)[number] = record
    launches = []
    for number, start in sorted(starts.items()):
        end = ends.get(number, {})
        launches.append(Launch(
            attempt=number, job=str(start.get("job", "")), resume=start.get("mode") == "resume",
            requeue=bool(start.get("requeue")), start=float(start.get("time", 0.0)),
            end=_number(end.get("time")), exit_status=_integer(end.get("exit")), steps=_integer(end.get("steps")),
            checkpoint=_integer(end.get("checkpoint")) if end.get("checkpoint", -1) != -1 else None,
            checkpoint_time=_number(end.get("checkpoint_time")) or None, why=end.get("why") or None))
    return launches


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _integer(value) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(rec: PointRecord, launches: list[Launch]) -> None:
    """Fill ``rec.attempts`` from the script's launches: the first launch of a submitted job completes that
    job's attempt; further launches of the job (retries, a requeued run) become attempts of their own."""
    for launch in launches:
        attempt = next((a for a in rec.attempts if a.number == launch.attempt), None)
        if attempt is None:
            same_job = [a for a in rec.attempts if job_key(a.job_id) == launch.job]
            waiting = [a for a in same_job if a.number is None]
            if waiting:
                attempt = waiting[0]
                attempt.cause = "requeue" if launch.requeue else "submitted"
            else:
                template = same_job[-1] if same_job else None
                attempt = Attempt(job_id=template.job_id if template else launch.job,
                                  script=template.script if template else "",
                                  submitted_at=template.submitted_at if template else _iso(launch.start) or "",
                                  resume=launch.resume, job_name=template.job_name if template else "",
                                  cause="requeue" if launch.requeue else "retry")
                rec.attempts.append(attempt)
            attempt.number = launch.attempt
        attempt.resume = launch.resume
        attempt.started_at, attempt.ended_at = _iso(launch.start), _iso(launch.end)
        attempt.exit_status, attempt.steps_reached = launch.exit_status, launch.steps
        attempt.checkpoint_step, attempt.time_lost_s, attempt.note = launch.checkpoint, launch.time_lost_s, launch.why
    # Launch order; attempts submitted but not started yet come last.
    rec.attempts.sort(key=lambda a: (a.number is None, a.number or 0))


def merge_from_files(output_dir: str | Path, rec: PointRecord) -> None:
    merge(rec, read_launches(records_path(output_dir, rec.point_id)))


def describe(rec: PointRecord) -> str:
    """Launches in a few words for `sweep status`: ``3 (2 retries)``, ``2 (1 requeue)``, ``1``."""
    started = [a for a in rec.attempts if a.number is not None]
    if not started:
        return "-"
    retries = sum(1 for a in started if a.cause == "retry")
    requeues = sum(1 for a in started if a.cause == "requeue")
    parts = [f"{retries} retr{'y' if retries == 1 else 'ies'}"] if retries else []
    parts += [f"{requeues} requeue{'' if requeues == 1 else 's'}"] if requeues else []
    return f"{len(started)}" + (f" ({', '.join(parts)})" if parts else "")


def last_note(rec: PointRecord) -> str | None:
    """Why the script stopped retrying the point's latest launch, if it said."""
    started = [a for a in rec.attempts if a.number is not None]
    return started[-1].note if started else None
