"""Runs that heal themselves (issue #17): the job script's retries inside an allocation and its requeue handling.

Fast tests run the real generated scripts with bash under the ``local`` scheduler, with a small stand-in for
``python -m scaling.train`` that logs steps, writes checkpoint files and fails where told (per launch), so
each rule of the retry loop is checked on real processes in seconds:

- a run failing twice with progress is relaunched with ``--resume`` and ends complete after 3 attempts;
- a usage error (exit 2) is never retried; a run failing at the same step twice stops with one clear line;
- ``job.max_retries`` bounds the retries; a walltime stop (75) is not retried;
- a requeued job (the same script run again under the same job id) resumes its points and never reruns a
  complete one.

The real trainer (2 Horovod ranks, one SIGKILLed twice after a checkpoint) and the real Slurm (a kill inside
sbatch, ``scontrol requeue``) are in tests/test_jobs_faults.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from jobs.attempts import read_launches, records_path
from jobs.manifest import load_manifest
from jobs.submit import submit
from jobs.sweep import job_groups, plan
from tests.test_jobs import base_spec, run_cli, stand_in_env

# A stand-in trainer: logs one JSON line per step (the run format's keys that jobs/ reads), writes a checkpoint
# file every --checkpoint-every steps, resumes from the newest one with --resume (dropping the steps after it
# from the log, like the trainer), and fails as STANDIN_FAILS says for the n-th launch of this run directory:
# "5:1,5:1" = launch 1 fails at step 5 with exit 1, launch 2 the same, later launches run to the end (only in
# run directories whose path contains STANDIN_ONLY, when that is set).
STAND_IN = r'''
import json, os, signal, sys, time
args = sys.argv[1:]
opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
out, steps = opt["--out"], int(opt["--steps"])
every, gb = int(opt.get("--checkpoint-every", "1000000")), int(opt["--global-batch"])
os.makedirs(out + "/steps", exist_ok=True)
os.makedirs(out + "/checkpoints", exist_ok=True)
with open(out + "/launches.txt", "a") as fh:
    fh.write(" ".join(args) + "\n")
launch = len(open(out + "/launches.txt").read().splitlines())
fails = [f.split(":") for f in os.environ.get("STANDIN_FAILS", "").split(",") if f]
if os.environ.get("STANDIN_ONLY", "/") not in out:
    fails = []
fail_step, fail_exit = (int(fails[launch - 1][0]), int(fails[launch - 1][1])) if launch <= len(fails) else (-1, 0)
if fail_step == 0 and fail_exit == 2:
    print("usage: scaling.train: error: unrecognized arguments", file=sys.stderr)
    sys.exit(2)
start = 0
if "--resume" in args:
    names = sorted(os.listdir(out + "/checkpoints"))
    start = int(names[-1][5:13]) if names else 0
log = out + "/steps/rank-00000.jsonl"
kept = [l for l in open(log).read().splitlines() if json.loads(l)["step"] < start] if os.path.exists(log) else []
with open(log, "w") as fh:
    fh.writelines(l + "\n" for l in kept)
step_s = float(os.environ.get("STANDIN_STEP_S", "0.002"))


def finish(status, done):
    t = {"images_per_s": 1.0, "ci95_low": 1.0, "ci95_high": 1.0, "per_rank_images_per_s": [1.0]}
    summary = {"schema": "larscale.run/1", "status": status, "config": opt, "model": "tiny",
        "framework": "torch", "dataset": "synthetic", "device": "cpu", "precision": "fp32", "ranks": 1,
        "ranks_per_node": 1, "nodes": 1, "hosts": ["h"], "threads_per_rank": 1, "global_batch": gb,
        "batch_per_rank": gb, "steps_done": done, "steps_planned": steps, "warmup_steps_excluded": 0,
        "versions": {}, "controller": "none", "throughput": t,
        "times": {"step_s": step_s, "data_s": 0.0, "compute_s": 0.001, "allreduce_s": 0.0, "optimizer_s": 0.0},
        "eval": None, "started_at": "a", "finished_at": "b", "checkpoint": None}
    json.dump(summary, open(out + "/summary.json", "w"), indent=2, sort_keys=True)


# SIGTERM/SIGUSR1: checkpoint at the end of the step and exit 75, as the trainer does.
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
with open(log, "a", buffering=1) as fh:
    for step in range(start, steps):
        if step == fail_step:
            sys.exit(fail_exit)
        time.sleep(step_s)
        fh.write(json.dumps({"step": step, "epoch": 0, "rank": 0, "ranks": 1, "batch_per_rank": gb,
                             "global_batch": gb, "data_s": 0.0, "compute_s": 0.001, "allreduce_s": 0.0,
                             "optimizer_s": 0.0, "step_s": step_s, "images_per_s": gb / step_s, "lr": 0.1,
                             "loss": 1.0, "time": time.time()}, separators=(",", ":")) + "\n")
        if (step + 1) % every == 0 or stop:
            open(out + "/checkpoints/ckpt-%08d.pt" % (step + 1), "w").close()
        if stop:
            finish("interrupted", step + 1)
            sys.exit(75)
finish("complete", steps)
'''


@pytest.fixture
def stand_in(tmp_path: Path) -> dict[str, str]:
    """The environment of a local job whose mpirun and scaling.train are the stand-ins."""
    return stand_in_env(tmp_path, STAND_IN)


def one_point_plan(tmp_path: Path, steps: int = 20, every: int = 4, nodes: int = 1, repetitions: int = 1,
                   **job):
    spec = base_spec(machine="local", repetitions=repetitions,
                     sweep={"kind": "strong", "nodes": [nodes], "global_batch": 2, "ranks_per_node": 1,
                            "threads_per_rank": 1},
                     training={"steps": steps, "checkpoint_every": every, "image_size": 16, "warmup_steps": 0},
                     job={"retry_backoff_s": 0, **job})
    return plan(spec, output_dir=tmp_path / "sweep")


def launches_argv(run_dir: str | Path) -> list[str]:
    return Path(run_dir, "launches.txt").read_text().splitlines()


def job_log(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((out / "logs").glob("*.out")))


def test_two_failures_with_progress_end_complete_after_three_attempts(tmp_path: Path, stand_in) -> None:
    the_plan = one_point_plan(tmp_path)
    env = {**stand_in, "STANDIN_FAILS": "6:1,13:70"}
    manifest = submit(the_plan, env=env)
    (rec,) = manifest.points.values()
    log = job_log(the_plan.output_dir)
    assert rec.state == "complete" and rec.exit_status == 0, (rec, log)
    assert [(a.number, a.cause, a.exit_status, a.steps_reached, a.checkpoint_step, a.resume)
            for a in rec.attempts] == [(1, "submitted", 1, 6, 4, False), (2, "retry", 70, 13, 12, True),
                                       (3, "retry", 0, 20, 20, True)]
    assert {a.job_id for a in rec.attempts} == {rec.job_id}
    assert all(a.time_lost_s is not None and a.time_lost_s >= 0 for a in rec.attempts)
    assert rec.attempts[-1].time_lost_s == 0
    # The retries resumed (the first launch did not); the step log holds each step once.
    argvs = launches_argv(rec.run_dir)
    assert ["--resume" in a.split() for a in argvs] == [False, True, True]
    steps = [json.loads(line)["step"] for line in Path(rec.run_dir, "steps", "rank-00000.jsonl").read_text().split()]
    assert steps == list(range(20))
    assert log.count("retry 1 of 2") == 1 and log.count("retry 2 of 2") == 1
    # The manifest on disk says the same; `sweep status` shows the attempts.
    again = load_manifest(the_plan.output_dir).points[rec.point_id]
    assert [a.number for a in again.attempts] == [1, 2, 3]
    status = run_cli("sweep", "status", str(the_plan.output_dir))
    assert status.returncode == 0 and "3 (2 retries)" in status.stdout, status.stdout


def test_usage_error_is_not_retried(tmp_path: Path, stand_in) -> None:
    the_plan = one_point_plan(tmp_path)
    manifest = submit(the_plan, env={**stand_in, "STANDIN_FAILS": "0:2"})
    (rec,) = manifest.points.values()
    assert rec.state == "failed" and rec.exit_status == 2
    assert len(rec.attempts) == 1 and rec.attempts[0].exit_status == 2
    assert "usage error: not retried" in rec.reason
    assert len(launches_argv(rec.run_dir)) == 1
    assert job_log(the_plan.output_dir).count("not retried") == 1


def test_failing_at_the_same_step_twice_stops_with_one_clear_line(tmp_path: Path, stand_in) -> None:
    the_plan = one_point_plan(tmp_path, max_retries=5)
    manifest = submit(the_plan, env={**stand_in, "STANDIN_FAILS": "9:1,9:1,9:1,9:1"})
    (rec,) = manifest.points.values()
    log = job_log(the_plan.output_dir)
    assert rec.state == "failed" and rec.exit_status == 1
    assert [(a.exit_status, a.steps_reached) for a in rec.attempts] == [(1, 9), (1, 9)]
    line = [ln for ln in log.splitlines() if "no progress" in ln]
    assert line == [f"larscale: {rec.point_id}: attempt 2 exited 1: no progress: failed at step 9, no further "
                    "than attempt 1: not retried"], log
    assert "no progress" in rec.reason and "no progress" in rec.attempts[-1].note


def test_max_retries_bounds_the_relaunches(tmp_path: Path, stand_in) -> None:
    the_plan = one_point_plan(tmp_path, max_retries=1)
    manifest = submit(the_plan, env={**stand_in, "STANDIN_FAILS": "3:1,7:1,11:1"})
    (rec,) = manifest.points.values()
    assert rec.state == "failed" and len(rec.attempts) == 2
    assert "job.max_retries 1" in rec.reason
    # Resubmitting continues from the newest checkpoint (a new job, whose retries count afresh).
    manifest = submit(the_plan, env={**stand_in, "STANDIN_FAILS": "3:1,7:1,11:1"})
    rec = manifest.points[rec.point_id]
    assert rec.state == "complete", rec
    assert [(a.number, a.cause) for a in rec.attempts] == [(1, "submitted"), (2, "retry"), (3, "submitted"),
                                                           (4, "retry")]
    assert len({a.job_id for a in rec.attempts}) == 2 and rec.script.endswith(".try2.sh")


def test_walltime_stop_is_not_retried(tmp_path: Path, stand_in) -> None:
    the_plan = one_point_plan(tmp_path)
    manifest = submit(the_plan, env={**stand_in, "STANDIN_FAILS": "5:75"})
    (rec,) = manifest.points.values()
    assert rec.state == "interrupted" and len(rec.attempts) == 1 and rec.attempts[0].time_lost_s == 0


def test_torchrun_walltime_stop_counts_as_interrupted(tmp_path: Path, stand_in) -> None:
    """torchrun passes SIGTERM to its workers, which checkpoint and exit 75, then reports the signal as its own
    failure (exit 1): the script records the trainer's stop (75), the point is interrupted, not failed. The
    local runner's timeout sends the script that SIGTERM, as PBS does at the walltime."""
    spec = base_spec(machine="local", sweep={"kind": "strong", "nodes": [1], "global_batch": 2,
                                             "ranks_per_node": 1, "threads_per_rank": 1},
                     training={"steps": 2000, "checkpoint_every": 1000, "image_size": 16, "warmup_steps": 0,
                               "backend": "ddp"},
                     job={"launcher": "torchrun", "retry_backoff_s": 0})
    the_plan = plan(spec, output_dir=tmp_path / "sweep")
    manifest = submit(the_plan, env={**stand_in, "STANDIN_STEP_S": "0.02"}, timeout=12)
    (rec,) = manifest.points.values()
    log = job_log(the_plan.output_dir)
    assert "torch.distributed.run" in Path(rec.script).read_text()
    assert rec.state == "interrupted" and rec.exit_status == 75, (rec, log[-3000:])
    assert len(rec.attempts) == 1 and 0 < rec.attempts[0].checkpoint_step == rec.attempts[0].steps_reached < 2000
    assert "SignalException" in log        # torchrun's own complaint, which the script saw through


def run_script_again(the_plan, point_id: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """What a requeue does: the scheduler starts the same script again, under the same job id."""
    rec = load_manifest(the_plan.output_dir).points[point_id]
    return subprocess.run(["bash", rec.script], cwd=the_plan.output_dir, capture_output=True, text=True,
                          env={**env, "LARSCALE_JOB_ID": rec.job_id}, timeout=120)


def test_requeued_job_resumes_its_point_and_never_reruns_a_complete_one(tmp_path: Path, stand_in) -> None:
    the_plan = one_point_plan(tmp_path, repetitions=2, pack=True)
    (group,) = job_groups(the_plan)
    first, second = (p.point_id for p in group.points)
    # The job's first run: point 1 completes, point 2 is stopped at the walltime (75) at step 10.
    env = {**stand_in, "STANDIN_FAILS": "10:75", "STANDIN_ONLY": f"/{second}"}
    manifest = submit(the_plan, env=env)
    assert (manifest.points[first].state, manifest.points[second].state) == ("complete", "interrupted")
    # The scheduler requeues the job: the same script runs again under the same job id.
    proc = run_script_again(the_plan, second, env)
    assert proc.returncode == 0, proc.stderr
    assert f"larscale: {first} is complete: not run again" in proc.stderr
    assert len(launches_argv(the_plan.run_dir(the_plan.point(first)))) == 1
    launches = read_launches(records_path(the_plan.output_dir, second))
    assert [(x.attempt, x.requeue, x.resume, x.exit_status) for x in launches] == [
        (1, False, False, 75), (2, True, True, 0)]
    status = run_cli("sweep", "status", str(the_plan.output_dir))
    assert status.returncode == 0 and "2 (1 requeue)" in status.stdout, status.stdout
    manifest = load_manifest(the_plan.output_dir)
    assert {r.state for r in manifest.points.values()} == {"complete"}
    # Requeued once more (a node failure after the end): nothing runs again.
    proc = run_script_again(the_plan, second, env)
    assert proc.returncode == 0 and f"larscale: {second} is complete: not run again" in proc.stderr
    assert len(launches_argv(the_plan.run_dir(the_plan.point(second)))) == 2
    assert len(read_launches(records_path(the_plan.output_dir, second))) == 2
