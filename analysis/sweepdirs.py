"""Sweep directories read for `larscale report`: every point of each manifest, measured or with the reason why not.

A sweep directory is what `larscale sweep submit` writes (``manifest.json``, schema ``larscale.sweep/1``, with
``runs/<point>/`` run directories in the ``scaling/`` run format). Only files are read, never written, and no
scheduler is asked: a point's run directory is the truth when it holds a complete run; otherwise the state and
reason the manifest last recorded (``larscale sweep status DIR`` refreshes them) say why the point has no
measurement. Every point of every manifest comes back, measured or not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.fitting import CalibrationError
from analysis.runs import RunMeasurement, read_run
from larscale.runformat import SWEEP_MANIFEST as MANIFEST
from larscale.runformat import SWEEP_SCHEMA


class ReportError(ValueError):
    """The inputs cannot make a report (not a sweep, nothing measured, models mixed): one line naming why."""


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: its configuration, and its measurement or why there is none."""

    sweep: str
    kind: str                        # strong | weak | grid
    point_id: str
    model: str
    nodes: int
    ranks_per_node: int
    global_batch: int
    batch_per_rank: int
    run_dir: str
    state: str                       # complete, failed, missing, interrupted, refused, malformed, planned, ...
    reason: str
    run: RunMeasurement | None = None

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def measured(self) -> bool:
        return self.run is not None


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    kind: str
    model: str
    machine: dict[str, Any]          # the profile the sweep was planned on (the manifest's copy)
    scheduler: str
    points: list[SweepPoint]


def _manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ReportError(f"{path}: no such directory")
    if not path.is_dir():
        raise ReportError(f"{path}: not a sweep directory (a file; give the directory `larscale sweep submit` "
                          "wrote)")
    manifest = path / MANIFEST
    if not manifest.exists():
        raise ReportError(f"{path}: not a sweep directory (no {MANIFEST}; `larscale sweep submit` writes one)")
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{manifest}:{err.lineno}: not JSON ({err.msg})") from None
    if not isinstance(data, dict) or data.get("schema") != SWEEP_SCHEMA:
        raise ReportError(f"{manifest}: not a larscale sweep manifest (schema {SWEEP_SCHEMA!r} expected)")
    return data


def _point(sweep: str, kind: str, model: str, root: Path, record: dict[str, Any]) -> SweepPoint:
    params = record.get("params") or {}
    run_dir = Path(record.get("run_dir") or root / "runs" / record["point_id"])
    if not run_dir.is_absolute():
        run_dir = root / run_dir
    inside = root / "runs" / str(record["point_id"])
    if inside.exists():             # this directory's own run, also when the sweep was copied off its cluster
        run_dir = inside
    state, reason = str(record.get("state") or "planned"), str(record.get("reason") or "")
    run = None
    summary = run_dir / "summary.json"
    if summary.exists():
        try:
            status = json.loads(summary.read_text()).get("status")
        except (json.JSONDecodeError, AttributeError):
            status = None
        if status == "complete" or state == "complete":
            try:
                run = read_run(run_dir)
                state, reason = "complete", ""
            except CalibrationError as err:
                state, reason = "malformed", str(err)
    elif state == "complete":
        state, reason = "malformed", f"{summary}: missing (the manifest says complete)"
    if run is None and not reason:
        reason = {"planned": "never submitted", "missing": "the job left no run"}.get(state, f"state {state}")
    if run is None and state in ("submitted", "pending", "running"):
        reason += " (the manifest's last state: `larscale sweep status` refreshes it)"
    return SweepPoint(sweep=sweep, kind=kind, point_id=str(record["point_id"]), model=model,
                      nodes=int(params.get("nodes") or 1), ranks_per_node=int(params.get("ranks_per_node") or 1),
                      global_batch=int(params.get("global_batch") or 0),
                      batch_per_rank=int(params.get("batch_per_rank") or 0), run_dir=str(run_dir), state=state,
                      reason=reason, run=run)


def read_sweep(path: str | Path) -> Sweep:
    """One sweep directory, every point with its measurement or the reason it has none. ReportError names
    what makes the directory unusable."""
    root = Path(path)
    data = _manifest(root)
    spec = data.get("spec") or {}
    model = str(spec.get("model") or "")
    kind = str((spec.get("sweep") or {}).get("kind") or "grid")
    name = str(data.get("name") or root.name)
    points = [_point(name, kind, model, root, dict(record)) for record in (data.get("points") or {}).values()]
    if not points:
        raise ReportError(f"{root}: the manifest lists no point")
    return Sweep(name=name, path=root, kind=kind, model=model, machine=dict(data.get("machine") or {}),
                 scheduler=str(data.get("scheduler") or ""), points=points)


def read_sweeps(paths: Sequence[str | Path]) -> list[Sweep]:
    """Several sweeps of one model on one machine (e.g. its strong and its weak sweep). ReportError when they mix
    models or machines, or when no point of any of them was measured."""
    if not paths:
        raise ReportError("give at least one sweep directory")
    sweeps = [read_sweep(p) for p in paths]
    models = {s.model for s in sweeps}
    if len(models) > 1:
        raise ReportError("the sweeps mix models (" + ", ".join(f"{s.path}: {s.model}" for s in sweeps)
                          + "): report one model at a time")
    machines = {s.machine.get("name") for s in sweeps}
    if len(machines) > 1:
        raise ReportError("the sweeps ran on different machines (" + ", ".join(
            f"{s.path}: {s.machine.get('name')}" for s in sweeps) + "): report one machine at a time")
    if not any(p.measured for s in sweeps for p in s.points):
        states = ", ".join(f"{p.point_id} {p.state}" for s in sweeps for p in s.points)
        raise ReportError(f"no point of {', '.join(str(s.path) for s in sweeps)} has a complete run ({states}): "
                          "nothing to report")
    return sweeps


def check_profile_matches(profile, sweeps: Sequence[Sweep]) -> None:
    """The profile must describe the machine the sweeps ran on: the same profile, or one calibrated from it."""
    ran_on = sweeps[0].machine.get("name")
    if not ran_on:
        return
    base = (profile.calibration or {}).get("base_profile")
    if ran_on not in (profile.name, base):
        raise ReportError(f"--machine {profile.name}: the sweeps ran on machine {ran_on!r} "
                          f"({sweeps[0].path / MANIFEST}); give that profile or one calibrated from it")
