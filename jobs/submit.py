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
from jobs.schedulers import SchedulerUnavailable, SubmitError, get_scheduler
from jobs.scripts import SCHEDULERS, check_launch, render, submit_command
from jobs.sweep import Plan, job_groups
from larscale.runformat import EXIT_RESUMABLE


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
    ``Job <123> is submitted``, ``ƒM7Zq9AKHno``)."""
    return get_scheduler(scheduler).parse_job_id(stdout)


def poll_interval_s(manifest: Manifest) -> float:
    """Seconds between two queries of the sweep's scheduler: the profile's ``limits.poll_interval_s``, else the
    scheduler's own minimum (30 s for the batch systems: site rules forbid hammering squeue)."""
    limits = manifest.machine.get("limits") or {}
    value = limits.get("poll_interval_s")
    return float(value) if value is not None else get_scheduler(manifest.scheduler).min_poll_s


def scheduler_states(scheduler: str, job_ids: list[str], env: Mapping[str, str] | None = None
                     ) -> dict[str, tuple[str | None, str]]:
    """job id → (our active state or None when finished/unknown, the scheduler's own word): one query for all."""
    if not job_ids:
        return {}
    return get_scheduler(scheduler).query(job_ids, lambda argv: _run(argv, env))


def _live_states(manifest: Manifest, job_ids: list[str], env: Mapping[str, str] | None
                 ) -> dict[str, tuple[str | None, str]]:
    """The scheduler's states of these jobs, asked at most once per poll interval: within it, the answer of
    the last query (kept in the manifest) stands."""
    cached = manifest.scheduler_cache
    fresh = manifest.polled_at is not None and time.time() - manifest.polled_at < poll_interval_s(manifest)
    if fresh and all(j in cached for j in job_ids):
        return {j: (cached[j][0], cached[j][1]) for j in job_ids}
    try:
        live = scheduler_states(manifest.scheduler, job_ids, env)
    except SchedulerUnavailable:
        # No answer is not an answer: jobs known to be queued or running stay so until the scheduler says.
        return {j: (cached[j][0], cached[j][1]) if j in cached else ("pending", "NO ANSWER") for j in job_ids}
    manifest.polled_at = time.time()
    manifest.scheduler_cache = {j: [state, word] for j, (state, word) in live.items()}
    return live


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
    jobs = sorted({j for rec in pending for j in (rec.chain or [rec.job_id]) if j})
    live = _live_states(manifest, jobs, env)
    for rec in pending:
        merge_from_files(output_dir, rec)
        # A chain of dependent jobs: the point is active while any of its jobs is queued or running.
        links = [(j, *live.get(j, (None, "UNKNOWN"))) for j in (rec.chain or [rec.job_id])]
        job_id, active, word = next((link for link in links if link[1] is not None), links[-1])
        if active is not None:
            rec.job_id = job_id
            rec.state, rec.reason = active, f"{manifest.scheduler} job {job_id} {word}"
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

    links = max(1, plan.spec.job.chain)
    for group, path in zip(groups, scripts, strict=True):
        job_name = group.job_name
        if get_scheduler(scheduler).runs_here:
            for link in range(links):   # a chain runs its links one after another; a complete point skips them
                resumed = resume if link == 0 else {p.point_id for p in group.points}
                _run_here(plan, manifest, group, path, resumed, env, timeout, progress, report, report_training,
                          finished)
                if all(manifest.points[p.point_id].state == "complete" for p in group.points):
                    break
            continue
        if _held(manifest, plan):
            for p in group.points:
                rec = manifest.points[p.point_id]
                rec.reason = (f"held: limits.max_jobs {plan.machine.limits.max_jobs} jobs of this sweep are queued "
                              "or running; `sweep submit --wait` (or a later `sweep submit`) submits it")
            manifest.save()
            continue
        _submit_script(manifest, scheduler, out, path, [p.point_id for p in group.points], env, links,
                       resume=resume, job_name=job_name)
        for p in group.points:
            report(p.point_id, "submitted")
    return manifest


def _active_jobs(manifest: Manifest) -> int:
    return len({rec.job_id for rec in manifest.points.values() if rec.state in ACTIVE_STATES and rec.job_id})


def _held(manifest: Manifest, plan_or_limit) -> bool:
    """Whether the sweep already has limits.max_jobs jobs queued or running (a chain counts as one job each)."""
    limit = plan_or_limit.machine.limits.max_jobs if isinstance(plan_or_limit, Plan) else plan_or_limit
    return limit is not None and _active_jobs(manifest) >= limit


def _submit_script(manifest: Manifest, scheduler: str, out: Path, path: Path, point_ids: list[str],
                   env: Mapping[str, str] | None, links: int, resume, job_name: str) -> None:
    """Submit one job script (``links`` times, each job after the one before: a walltime chain) and record it."""
    chain: list[str] = []
    for _ in range(links):
        argv, on_stdin = submit_command(scheduler, f"scripts/{path.name}", tuple(chain[-1:]))
        if on_stdin:
            with open(path) as stdin:
                proc = _run(argv, env, cwd=out, stdin=stdin)
        else:
            proc = _run(argv, env, cwd=out)
        if proc.returncode != 0:
            manifest.save()
            raise SubmitError(f"{argv[0]} refused {path.name} (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()}")
        chain.append(parse_job_id(scheduler, proc.stdout))
    for point_id in point_ids:
        rec = manifest.points[point_id]
        rec.job_id, rec.state, rec.reason = chain[0], "submitted", None
        rec.chain = chain if links > 1 else []
        rec.attempts.append(Attempt(job_id=chain[0], script=str(path), submitted_at=now(),
                                    resume=point_id in resume, job_name=job_name))
    manifest.save()


def submit_held(manifest: Manifest, env: Mapping[str, str] | None = None) -> list[str]:
    """Submit the points that ``limits.max_jobs`` held back, while the limit allows; returns their ids."""
    limit = (manifest.machine.get("limits") or {}).get("max_jobs")
    links = max(1, int((manifest.spec.get("job") or {}).get("chain", 1)))
    scripts: dict[str, list[PointRecord]] = {}
    for rec in manifest.points.values():
        if rec.state == "planned" and rec.script and (rec.reason or "").startswith("held:"):
            scripts.setdefault(rec.script, []).append(rec)
    done: list[str] = []
    for script, recs in scripts.items():
        if _held(manifest, limit):
            break
        path = Path(script)
        _submit_script(manifest, manifest.scheduler, Path(manifest.output_dir), path, [r.point_id for r in recs],
                       env, links, resume={r.point_id for r in recs if r.attempts}, job_name=path.stem)
        done += [r.point_id for r in recs]
    return done


def _run_here(plan: Plan, manifest: Manifest, group, path: Path, resume, env, timeout, progress, report,
              report_training, finished: dict[str, str]) -> None:
    """Run one job script here (the local scheduler), wait for it and record its points' states."""
    out = plan.output_dir
    job_id = f"local-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    for p in group.points:
        rec = manifest.points[p.point_id]
        rec.state, rec.job_id = "running", job_id
        rec.attempts.append(Attempt(job_id=job_id, script=str(path), submitted_at=now(),
                                    resume=p.point_id in resume, job_name=group.job_name))
    manifest.save()
    report(group.points[0].point_id, "running")
    log = out / "logs" / f"{group.job_name}-local.out"
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
        if submit_held(manifest, env):
            manifest.save()
        active = [r for r in manifest.points.values() if r.state in ACTIVE_STATES
                  or (r.state == "planned" and (r.reason or "").startswith("held:"))]
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
