"""Submit a plan's points to a scheduler, track them in the manifest, and ask the scheduler how they are.

``submit(plan, scheduler=...)`` writes one script per job into ``<output>/scripts/``, records every point in
``<output>/manifest.json`` (atomically) and submits from the sweep directory. It never touches a point whose
run is complete (finished results are never overwritten) or whose job is still queued or running; a point
submitted before that did not complete is resubmitted with ``--resume`` (it continues from its checkpoint).

The ``local`` scheduler runs each job's script directly, one after another, waiting for each; a progress
callback hears after every run how many points are done, running and failed, and while a point trains, where
it is (``state == "training"``: step, images/s, ETA from its step log). ``wait`` does the same for a scheduler.
Each point's attempts (retries inside the allocation, requeues) come from the script's records
(jobs/attempts.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from jobs.attempts import last_note, merge_from_files, read_launches, records_path
from jobs.manifest import (
    ACTIVE_STATES,
    Attempt,
    Manifest,
    PointRecord,
    load_manifest,
    now,
)
from jobs.progress import RunProgress, read_progress
from jobs.scripts import SCHEDULERS, check_launch, render, submit_command
from jobs.sweep import Plan, job_groups
from larscale.runformat import EXIT_RESUMABLE


class SubmitError(RuntimeError):
    """The scheduler refused a submission (its message is included)."""


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives: counts over the submitted points, and the point that changed.
    ``state == "training"``: ``run`` says where the point is (from its step log), ``attempt`` which launch."""

    total: int
    done: int
    running: int
    failed: int
    point_id: str
    state: str
    run: RunProgress | None = None
    attempt: int | None = None


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


def _with_note(reason: str | None, rec: PointRecord, state: str) -> str | None:
    """A failed point's reason, with why the job script stopped retrying it when it said."""
    note = last_note(rec) if state == "failed" else None
    return f"{reason}: {note}" if note and reason else reason


def refresh(manifest: Manifest, env: Mapping[str, str] | None = None) -> Manifest:
    """Update every submitted point's state from its run files and the scheduler; saves the manifest."""
    output_dir = Path(manifest.output_dir)
    pending = [rec for rec in manifest.points.values() if rec.job_id and rec.state not in ("complete",)]
    live = scheduler_states(manifest.scheduler, sorted({rec.job_id for rec in pending if rec.job_id}), env)
    for rec in pending:
        merge_from_files(output_dir, rec)
        active, word = live.get(rec.job_id, (None, "UNKNOWN")) if rec.job_id else (None, "")
        if active is not None:
            rec.state, rec.reason = active, f"{manifest.scheduler} job {rec.job_id} {word}"
            continue
        state, reason, exit_status = run_state(output_dir, rec)
        if state is not None:
            rec.state, rec.reason, rec.exit_status = state, _with_note(reason, rec, state), exit_status
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
    check_launch(plan)
    wanted = set(points) if points is not None else None
    if wanted is not None:
        unknown = wanted - {p.point_id for p in plan.points}
        if unknown:
            raise ValueError(f"--points: unknown point id(s) {', '.join(sorted(unknown))}; the plan has "
                             f"{', '.join(p.point_id for p in plan.points)}")
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
        # The n-th submission of a point (its attempts' distinct jobs + 1; retries and requeues share a job).
        attempt = 1 + max((len({a.job_id for a in manifest.points[p.point_id].attempts}) for p in group.points),
                          default=0)
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

    def report(point_id: str, state: str, run: RunProgress | None = None, attempt: int | None = None) -> None:
        if progress is not None:
            running = sum(1 for r in manifest.points.values() if r.point_id in {p.point_id for p in to_run}
                          and r.state in ("running",))
            progress(Progress(total=total, done=sum(1 for s in finished.values() if s == "complete"),
                              running=running, failed=sum(1 for s in finished.values() if s != "complete"),
                              point_id=point_id, state=state, run=run, attempt=attempt))

    def report_training(point_id: str, run: RunProgress, attempt: int | None) -> None:
        report(point_id, "training", run, attempt)

    for group, path in zip(groups, scripts, strict=True):
        job_name = group.job_name
        if scheduler == "local":
            job_id = f"local-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
            for p in group.points:
                rec = manifest.points[p.point_id]
                rec.state, rec.job_id = "running", job_id
                rec.attempts.append(Attempt(job_id=job_id, script=str(path), submitted_at=now(),
                                            resume=p.point_id in resume, job_name=job_name))
            manifest.save()
            report(group.points[0].point_id, "running")
            log = out / "logs" / f"{job_name}-local.out"
            base_env = dict(env) if env is not None else _local_env()
            base_env["LARSCALE_JOB_ID"] = job_id      # the script's attempt records name this job
            finished_early = _run_local_job(path, out, base_env, log, timeout, group_points=group.points,
                                            plan=plan, on_training=report_training if progress else None)
            for p in group.points:
                rec = manifest.points[p.point_id]
                merge_from_files(out, rec)
                state, reason, exit_status = run_state(out, rec)
                rec.state = state or "failed"
                rec.reason = _with_note(reason, rec, state) if state else (
                    finished_early or f"no exit status (see {log})")
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


def _running_point(out: Path, points, since: float):
    """The point of a local job that is running now: started by this job (its ``.started`` is newer than
    ``since``) and not finished (no ``.exit``: the script removes a stale one when it starts a point)."""
    for p in points:
        started = out / "status" / f"{p.point_id}.started"
        try:
            fresh = started.stat().st_mtime >= since - 1
        except FileNotFoundError:
            continue
        if fresh and not (out / "status" / f"{p.point_id}.exit").exists():
            return p
    return None


def attempt_number(output_dir: Path, point_id: str) -> int | None:
    """The number of the point's newest launch in the script's records (None before the first)."""
    launches = read_launches(records_path(output_dir, point_id))
    return launches[-1].attempt if launches else None


# Seconds a local job gets to checkpoint and stop after SIGTERM (timeout, Ctrl-C) before it is killed.
LOCAL_STOP_GRACE_S = 60.0


def _run_local_job(path: Path, out: Path, env: dict[str, str], log: Path, timeout: float | None,
                   group_points, plan: Plan, on_training, poll_s: float = 1.0) -> str | None:
    """Run one local job script to its end, reporting the running point's progress every ``poll_s``.

    The script runs in its own session, so its launcher and ranks form one process group that we alone
    signal: on the timeout or Ctrl-C the script gets SIGTERM (it asks the trainer to checkpoint and stop, as
    at a walltime) and the group is killed only if it is still there ``LOCAL_STOP_GRACE_S`` later. Returns a
    reason when the job was stopped that way, else None."""
    started = time.time()
    deadline = time.monotonic() + timeout if timeout else None
    steps_planned = plan.spec.training.steps
    reason = None
    with open(log, "a") as fh:
        proc = subprocess.Popen(["bash", str(path)], cwd=out, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while True:
                try:
                    proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if deadline is not None and time.monotonic() > deadline:
                    reason = f"stopped after the --timeout of {timeout:.0f} s (see {log})"
                    fh.write(f"larscale: job {path.stem} {reason}\n")
                    fh.flush()
                    _stop_local(proc)
                    break
                if on_training is not None:
                    point = _running_point(out, group_points, started)
                    if point is not None:
                        run = read_progress(plan.run_dir(point), steps_planned)
                        if run is not None:
                            on_training(point.point_id, run, attempt_number(out, point.point_id))
        except BaseException:       # Ctrl-C: let the trainer checkpoint, then pass the interrupt on
            _stop_local(proc)
            raise
    return reason


def _stop_local(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=LOCAL_STOP_GRACE_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):   # out of time, or a second Ctrl-C: kill now
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


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
    deadline = time.monotonic() + timeout
    while True:
        manifest = status(output_dir, env)
        active = [r for r in manifest.points.values() if r.state in ACTIVE_STATES]
        if progress is not None:
            counts = manifest.counts()
            tally = {"total": len(manifest.points), "done": counts.get("complete", 0),
                     "running": counts.get("running", 0),
                     "failed": sum(counts.get(s, 0) for s in ("failed", "missing", "interrupted"))}
            progress(Progress(**tally, point_id="", state="poll"))
            steps_planned = (manifest.spec.get("training") or {}).get("steps")
            for rec in active:
                run = read_progress(rec.run_dir, steps_planned) if rec.state == "running" else None
                if run is not None:
                    progress(Progress(**tally, point_id=rec.point_id, state="training", run=run,
                                      attempt=attempt_number(Path(manifest.output_dir), rec.point_id)))
        if not active:
            return manifest
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(active)} point(s) still queued or running after {timeout:.0f} s: "
                               + ", ".join(f"{r.point_id} ({r.state})" for r in active))
        time.sleep(poll_s)
