"""Submit a plan's points to a scheduler, track them in the manifest, and ask the scheduler how they are.

``submit(plan, scheduler=...)`` writes one script per job into ``<output>/scripts/``, records every point in
``<output>/manifest.json`` (atomically) and submits from the sweep directory. It never touches a point whose
run is complete (finished results are never overwritten) or whose job is still queued or running; a point
submitted before that did not complete is resubmitted with ``--resume`` (it continues from its checkpoint).

The ``local`` scheduler runs each job's script directly, one after another, waiting for each; a progress
callback hears after every run how many points are done, running and failed.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from jobs.manifest import (
    ACTIVE_STATES,
    Attempt,
    Manifest,
    PointRecord,
    load_manifest,
    now,
)
from jobs.scripts import SCHEDULERS, render, submit_command
from jobs.sweep import Plan, job_groups
from larscale.runformat import EXIT_RESUMABLE


class SubmitError(RuntimeError):
    """The scheduler refused a submission (its message is included)."""


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives: counts over the submitted points, and the point that changed."""

    total: int
    done: int
    running: int
    failed: int
    point_id: str
    state: str


ProgressCallback = Callable[[Progress], None]


# ------------------------------------------------------------------------------------------------- scheduler


def _run(argv: list[str], env: Mapping[str, str] | None, cwd: Path | None = None, stdin=None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, env=dict(env) if env is not None else None, cwd=cwd, stdin=stdin,
                              capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SubmitError(f"{argv[0]} not found on PATH: is this a {argv[0]} machine?") from None


def parse_job_id(scheduler: str, stdout: str) -> str:
    """The job id in a submission command's output (``123`` / ``123;cluster``, ``123.server``,
    ``Job <123> is submitted``)."""
    text = stdout.strip()
    if scheduler == "slurm":
        job_id = text.splitlines()[-1].split(";")[0].strip() if text else ""
    elif scheduler == "pbs":
        job_id = text.splitlines()[-1].strip() if text else ""
    elif scheduler == "lsf":
        start, end = text.find("<"), text.find(">")
        job_id = text[start + 1:end] if 0 <= start < end else ""
    else:
        raise ValueError(f"scheduler {scheduler!r} has no job ids")
    if not job_id or any(c.isspace() for c in job_id):
        raise SubmitError(f"cannot read a job id from the {scheduler} submission output {stdout!r}")
    return job_id


# Scheduler state words → our states. Anything finished maps to None: the run's own files decide.
_SLURM = {"PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
          "REQUEUE_FED": "pending", "RESIZING": "running", "RUNNING": "running", "COMPLETING": "running",
          "SUSPENDED": "running", "STOPPED": "running", "SIGNALING": "running", "STAGE_OUT": "running"}
_PBS = {"Q": "pending", "H": "pending", "W": "pending", "T": "pending", "S": "running", "R": "running",
        "E": "running", "B": "running"}
_LSF = {"PEND": "pending", "PSUSP": "pending", "RUN": "running", "USUSP": "running", "SSUSP": "running"}


def scheduler_states(scheduler: str, job_ids: list[str], env: Mapping[str, str] | None = None
                     ) -> dict[str, tuple[str | None, str]]:
    """job id → (our active state or None when finished/unknown, the scheduler's own word)."""
    out: dict[str, tuple[str | None, str]] = {}
    if not job_ids or scheduler == "local":
        return out
    if scheduler == "slurm":
        proc = _run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], env)
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = (_SLURM.get(parts[1]), parts[1])
        for job_id in job_ids:
            if job_id in out:
                continue
            # Finished jobs: the controller remembers them for MinJobAge, accounting for longer.
            proc = _run(["scontrol", "-o", "show", "job", job_id], env)
            fields = dict(t.split("=", 1) for t in proc.stdout.split() if "=" in t)
            word = fields.get("JobState")
            if word is None:
                proc = _run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], env)
                word = proc.stdout.split("\n")[0].split()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
            out[job_id] = (_SLURM.get(word), word or "UNKNOWN")
    elif scheduler == "pbs":
        for job_id in job_ids:
            proc = _run(["qstat", "-x", "-f", "-F", "json", job_id], env)
            try:
                jobs = json.loads(proc.stdout).get("Jobs", {})
                word = next(iter(jobs.values())).get("job_state", "") if jobs else ""
            except (json.JSONDecodeError, StopIteration, AttributeError):
                word = ""
            out[job_id] = (_PBS.get(word), word or "UNKNOWN")
    elif scheduler == "lsf":
        proc = _run(["bjobs", "-noheader", "-o", "jobid stat", *job_ids], env)
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = (_LSF.get(parts[1]), parts[1])
    return out


# ------------------------------------------------------------------------------------------------- run state


def run_state(output_dir: Path, rec: PointRecord) -> tuple[str | None, str | None, int | None]:
    """(state, reason, exit status) from the files a run left, or state None when it left nothing final."""
    exit_file = output_dir / "status" / f"{rec.point_id}.exit"
    exit_status = None
    if exit_file.exists():
        try:
            exit_status = int(exit_file.read_text().strip())
        except ValueError:
            exit_status = None
    summary_status = None
    summary_path = Path(rec.run_dir) / "summary.json"
    if summary_path.exists():
        try:
            summary_status = json.loads(summary_path.read_text()).get("status")
        except (json.JSONDecodeError, AttributeError, OSError):
            summary_status = "unreadable"
    if summary_status == "complete" and exit_status in (None, 0):
        return "complete", None, exit_status
    if exit_status == EXIT_RESUMABLE or (exit_status is None and summary_status == "interrupted"):
        return "interrupted", "stopped by a signal after a checkpoint (resubmit to resume)", exit_status
    if exit_status is not None:
        why = f"exit status {exit_status}"
        if summary_status:
            why += f", summary status {summary_status!r}"
        elif exit_status == 0:
            why += " but no summary.json"
        return "failed", why, exit_status
    return None, None, None


def refresh(manifest: Manifest, env: Mapping[str, str] | None = None) -> Manifest:
    """Update every submitted point's state from its run files and the scheduler; saves the manifest."""
    output_dir = Path(manifest.output_dir)
    pending = [rec for rec in manifest.points.values() if rec.job_id and rec.state not in ("complete",)]
    live = scheduler_states(manifest.scheduler, sorted({rec.job_id for rec in pending if rec.job_id}), env)
    for rec in pending:
        active, word = live.get(rec.job_id, (None, "UNKNOWN")) if rec.job_id else (None, "")
        if active is not None:
            rec.state, rec.reason = active, f"{manifest.scheduler} job {rec.job_id} {word}"
            continue
        state, reason, exit_status = run_state(output_dir, rec)
        if state is not None:
            rec.state, rec.reason, rec.exit_status = state, reason, exit_status
        elif rec.state in ACTIVE_STATES:
            started = (output_dir / "status" / f"{rec.point_id}.started").exists()
            rec.state = "missing"
            rec.reason = (f"{manifest.scheduler} job {rec.job_id} ended ({word}) "
                          + ("while the run was going: no exit status (killed at the walltime?)" if started
                             else "before the run started"))
    manifest.save()
    return manifest


def status(output_dir: str | Path, env: Mapping[str, str] | None = None) -> Manifest:
    """The sweep's manifest with fresh states (`larscale sweep status`)."""
    return refresh(load_manifest(output_dir), env)


# ------------------------------------------------------------------------------------------------- submit


def _new_manifest(plan: Plan, scheduler: str) -> Manifest:
    return Manifest(name=plan.spec.name, output_dir=str(plan.output_dir), scheduler=scheduler,
                    machine=plan.machine.to_dict(), spec=plan.spec.to_dict(), python=plan.python)


def submit(plan: Plan, scheduler: str | None = None, points: list[str] | None = None,
           progress: ProgressCallback | None = None, env: Mapping[str, str] | None = None,
           skip_refused: bool = False, dry_run: bool = False, timeout: float | None = None) -> Manifest:
    """Write scripts and the manifest, then submit (see the module docstring). Returns the manifest.

    ``scheduler`` overrides the profile's (e.g. ``"local"`` to run a cluster profile's points here);
    ``points`` limits the submission to these point ids; ``env`` is the environment of the submission
    commands (Slurm exports it to the job); ``dry_run`` writes scripts and manifest without submitting;
    ``timeout`` bounds each local job (seconds).
    """
    scheduler = scheduler or plan.machine.scheduler
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if scheduler != plan.machine.scheduler:
        plan = replace(plan, machine=replace(plan.machine, scheduler=scheduler))
    if plan.refused and not skip_refused:
        reasons = "; ".join(f"{p.point_id}: {p.refused}" for p in plan.refused)
        raise ValueError(f"{len(plan.refused)} point(s) refused: {reasons}")
    wanted = set(points) if points is not None else None
    if wanted is not None:
        unknown = wanted - {p.point_id for p in plan.points}
        if unknown:
            raise ValueError(f"unknown point id(s): {', '.join(sorted(unknown))}")
    out = plan.output_dir
    for sub in ("scripts", "logs", "status", "runs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = load_manifest(out)
        if manifest.name != plan.spec.name:
            raise ValueError(f"{out} holds sweep {manifest.name!r}, not {plan.spec.name!r}: choose another output")
        manifest.scheduler = scheduler
        manifest = refresh(manifest, env)
    else:
        manifest = _new_manifest(plan, scheduler)
    for p in plan.points:
        rec = manifest.points.get(p.point_id)
        if rec is None:
            manifest.points[p.point_id] = PointRecord(point_id=p.point_id, params=p.params(),
                                                      run_dir=str(plan.run_dir(p)))
        if p.refused:
            manifest.points[p.point_id].state, manifest.points[p.point_id].reason = "refused", p.refused
    to_run = []
    for p in plan.accepted:
        rec = manifest.points[p.point_id]
        if wanted is not None and p.point_id not in wanted:
            continue
        if rec.state == "complete" or rec.state in ACTIVE_STATES:
            continue          # finished results are kept; a queued or running job is not doubled
        to_run.append(p)
    resume = {p.point_id for p in to_run if manifest.points[p.point_id].attempts}
    groups = job_groups(plan, to_run)
    scripts = []
    for group in groups:
        attempt = 1 + max((len(manifest.points[p.point_id].attempts) for p in group.points), default=0)
        path = out / "scripts" / (f"{group.job_name}.sh" if attempt == 1 else f"{group.job_name}.try{attempt}.sh")
        path.write_text(render(plan, group, resume))
        path.chmod(0o755)
        scripts.append(path)
        for p in group.points:
            rec = manifest.points[p.point_id]
            rec.script, rec.state, rec.reason, rec.job_id, rec.exit_status = str(path), "planned", None, None, None
    manifest.save()
    if dry_run:
        return manifest
    total = len(to_run)
    finished: dict[str, str] = {}

    def report(point_id: str, state: str) -> None:
        if progress is not None:
            running = sum(1 for r in manifest.points.values() if r.point_id in {p.point_id for p in to_run}
                          and r.state in ("running",))
            progress(Progress(total=total, done=sum(1 for s in finished.values() if s == "complete"),
                              running=running, failed=sum(1 for s in finished.values() if s != "complete"),
                              point_id=point_id, state=state))

    for group, path in zip(groups, scripts, strict=True):
        job_name = group.job_name
        if scheduler == "local":
            for p in group.points:
                manifest.points[p.point_id].state = "running"
            job_id = f"local-{now()}"
            for p in group.points:
                rec = manifest.points[p.point_id]
                rec.job_id = job_id
                rec.attempts.append(Attempt(job_id=job_id, script=str(path), submitted_at=now(),
                                            resume=p.point_id in resume, job_name=job_name))
            manifest.save()
            report(group.points[0].point_id, "running")
            log = out / "logs" / f"{job_name}-local.out"
            base_env = dict(env) if env is not None else _local_env()
            with open(log, "a") as fh:
                try:
                    subprocess.run(["bash", str(path)], cwd=out, env=base_env, stdout=fh,
                                   stderr=subprocess.STDOUT, timeout=timeout)
                except subprocess.TimeoutExpired:
                    fh.write(f"larscale: job {job_name} killed after {timeout} s\n")
            for p in group.points:
                rec = manifest.points[p.point_id]
                state, reason, exit_status = run_state(out, rec)
                rec.state = state or "failed"
                rec.reason = reason if state else f"no exit status (see {log})"
                rec.exit_status = exit_status
                finished[p.point_id] = rec.state
                manifest.save()
                report(p.point_id, rec.state)
            continue
        argv, on_stdin = submit_command(scheduler, f"scripts/{path.name}")
        if on_stdin:
            with open(path) as stdin:
                proc = _run(argv, env, cwd=out, stdin=stdin)
        else:
            proc = _run(argv, env, cwd=out)
        if proc.returncode != 0:
            manifest.save()
            raise SubmitError(f"{argv[0]} refused {path.name} (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()}")
        job_id = parse_job_id(scheduler, proc.stdout)
        for p in group.points:
            rec = manifest.points[p.point_id]
            rec.job_id, rec.state, rec.reason = job_id, "submitted", None
            rec.attempts.append(Attempt(job_id=job_id, script=str(path), submitted_at=now(),
                                        resume=p.point_id in resume, job_name=job_name))
        manifest.save()
        for p in group.points:
            report(p.point_id, "submitted")
    return manifest


def _local_env() -> dict[str, str]:
    """The environment local runs need (Open MPI as root, tf-keras): scaling.launch.local_env."""
    try:
        from scaling.launch import local_env
    except ImportError:
        return dict(os.environ)
    return local_env()


def wait(output_dir: str | Path, timeout: float = 3600, poll_s: float = 2.0,
         env: Mapping[str, str] | None = None, progress: ProgressCallback | None = None) -> Manifest:
    """Poll the scheduler until no point of the sweep is queued or running (or ``timeout`` passes)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        manifest = status(output_dir, env)
        active = [r for r in manifest.points.values() if r.state in ACTIVE_STATES]
        if progress is not None:
            counts = manifest.counts()
            progress(Progress(total=len(manifest.points), done=counts.get("complete", 0),
                              running=counts.get("running", 0),
                              failed=sum(counts.get(s, 0) for s in ("failed", "missing", "interrupted")),
                              point_id="", state="poll"))
        if not active:
            return manifest
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(active)} point(s) still queued or running after {timeout:.0f} s: "
                               + ", ".join(f"{r.point_id} ({r.state})" for r in active))
        time.sleep(poll_s)
