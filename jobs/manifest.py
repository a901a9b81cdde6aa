"""The sweep manifest: ``<output>/manifest.json``, point id → parameters, script, job id, run dir, state.

Written atomically (temporary file in the same directory, fsync, rename), so a reader never sees half a file
and a crash mid-write keeps the previous version. States of a point:

``planned`` (script written, not submitted) → ``submitted`` → ``pending`` / ``running`` → ``complete`` |
``interrupted`` (stopped by a signal with a checkpoint: resubmit to resume) | ``failed`` | ``missing`` (the
scheduler forgot the job and the run left no exit status). ``refused`` points never go to the scheduler.
A point's ``attempts`` list every launch of its trainer: submissions, retries inside an allocation, requeues.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from larscale.runformat import SWEEP_MANIFEST as MANIFEST
from larscale.runformat import SWEEP_SCHEMA as SCHEMA
from larscale.runformat import write_json_atomic

FINAL_STATES = ("complete", "interrupted", "failed", "missing")
ACTIVE_STATES = ("submitted", "pending", "running")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Attempt:
    """One launch of a point's trainer. Created at submission; completed by `sweep status`/`collect` from the
    job script's records (jobs/attempts.py), where a retry inside the allocation or a requeued job adds an
    attempt of the same job."""

    job_id: str | None
    script: str
    submitted_at: str
    resume: bool
    job_name: str
    number: int | None = None            # the point's launch number in the script's records; None: not started
    cause: str = "submitted"             # "submitted" | "retry" (relaunched in its allocation) | "requeue"
    started_at: str | None = None
    ended_at: str | None = None
    exit_status: int | None = None       # None: running, or cut off with its job
    steps_reached: int | None = None     # steps the furthest rank had logged when it ended
    checkpoint_step: int | None = None   # the newest checkpoint then: where the next attempt resumes
    time_lost_s: float | None = None     # work redone by the next attempt (jobs/attempts.py defines it)
    note: str | None = None              # why the script stopped retrying


@dataclass
class PointRecord:
    point_id: str
    params: dict[str, Any]
    run_dir: str
    state: str = "planned"
    reason: str | None = None
    job_id: str | None = None
    script: str | None = None
    exit_status: int | None = None
    attempts: list[Attempt] = field(default_factory=list)
    # A walltime chain: the jobs submitted for this point, each to start after the one before (any exit) and
    # resume from the last checkpoint; job_id is the one that is (or was last) active.
    chain: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    name: str
    output_dir: str
    scheduler: str
    machine: dict[str, Any]
    spec: dict[str, Any]
    python: str
    points: dict[str, PointRecord] = field(default_factory=dict)
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)
    schema: str = SCHEMA
    # The last scheduler query (epoch seconds) and its answer, job id -> [state, word]: status is asked at most
    # once per poll interval, however often `sweep status` runs.
    polled_at: float | None = None
    scheduler_cache: dict[str, list] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.output_dir) / MANIFEST

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in self.points.values():
            out[rec.state] = out.get(rec.state, 0) + 1
        return out

    def save(self) -> Path:
        self.updated_at = now()
        write_json_atomic(self.path, self.to_dict())
        return self.path


def load_manifest(output_dir: str | Path) -> Manifest:
    """The manifest of a sweep directory (or of the manifest file itself); ValueError names what is wrong."""
    path = Path(output_dir)
    if path.is_dir():
        path = path / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no sweep manifest at {path} (run `larscale sweep submit` first)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a larscale sweep manifest (schema {SCHEMA!r} expected)")
    points = {}
    for pid, rec in data.get("points", {}).items():
        attempts = [Attempt(**a) for a in rec.pop("attempts", [])]
        points[pid] = PointRecord(**rec, attempts=attempts)
    data["points"] = points
    manifest = Manifest(**data)
    manifest.output_dir = str(path.parent.absolute())
    return manifest
