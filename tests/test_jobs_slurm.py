"""jobs/ against a real one-node Slurm (munged, slurmctld, slurmd started by tests/slurm_cluster.py).

- the fixture itself runs a trivial ``sbatch --wrap`` job;
- a real 2-point sweep (1 and 2 ranks, tiny synthetic training through mpirun inside sbatch) is submitted,
  waited for and collected into a table with measured throughput for both points;
- a job whose ``--time`` is shorter than its work gets Slurm's pre-timeout ``SIGUSR1`` (``--signal=B:USR1@N``),
  the trainer checkpoints and exits 75, and resubmitting the point (with ``--resume``) completes it;
- the batch script heals its point: rank 1 SIGKILLed twice after a checkpoint inside sbatch, the point ends
  complete after 3 attempts with the weights of an uninterrupted run, bit for bit;
- a job requeued by ``scontrol requeue`` resumes from its checkpoint and completes once.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.collect import collect
from jobs.submit import submit, wait
from jobs.sweep import plan
from tests import slurm_cluster as _slurm
from tests.slurm_cluster import SlurmCluster

slurm_cluster = _slurm.slurm_cluster  # the module-scoped fixture, used by name below

pytestmark = [pytest.mark.slurm]

PROFILE = """\
name: test-slurm
description: the one-node test Slurm of tests/slurm_cluster.py, Open MPI ranks on this machine
scheduler: slurm
launcher: mpirun
mpi_flavor: openmpi
launcher_flags: ["--oversubscribe", "--bind-to", "none"]
ranks_per_node: 2
node:
  cores: 2
  memory_gb: 4
  devices: {kind: cpu, model: test core, count: 2, peak_tflops: {fp32: 0.1}}
network:
  intra_node: {bandwidth_gbps: 20, latency_us: 4.0}
  inter_node: {bandwidth_gbps: 20, latency_us: 4.0}
limits: {max_nodes: 1, max_walltime: "00:20:00", poll_interval_s: 1}
"""


def trainer_available() -> bool:
    """The trainer and the modules it needs at run time (LR schedules, LARS) are importable."""
    code = "import scaling.train, scaling.schedules, scaling.optim"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def job_env(cluster: SlurmCluster) -> dict[str, str]:
    """What sbatch exports into the job: the cluster's SLURM_CONF plus what local Open MPI ranks need."""
    from scaling.launch import local_env

    return local_env(cluster.env, threads_per_rank=1)


def sweep_spec(profile: Path, name: str, steps: int, walltime: str, **training) -> dict:
    return {
        "name": name, "model": "tiny", "framework": "torch", "dataset": "synthetic", "machine": str(profile),
        "sweep": {"kind": "weak", "nodes": [1], "ranks_per_node": [1, 2], "batch_per_rank": 4,
                  "threads_per_rank": 1},
        "training": {"steps": steps, "optimizer": "lars", "lr": 0.1, "warmup_steps": 0, "image_size": 16,
                     "num_classes": 10, "extra_args": ["--no-eval"], **training},
        "job": {"walltime": walltime, "signal_s": 55},
    }


def test_fixture_runs_a_trivial_batch_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "hello.out"
    proc = slurm_cluster.run(["sbatch", "--parsable", "-n", "2", f"--output={out}",
                              "--wrap", "echo tasks=$SLURM_NTASKS node=$SLURMD_NODENAME"])
    job_id = proc.stdout.strip().split(";")[0]
    assert slurm_cluster.wait_job(job_id, timeout=60) == ("COMPLETED", "0:0")
    assert out.read_text().split() == ["tasks=2", f"node={slurm_cluster.node}"]


@pytest.fixture(scope="module")
def two_point_sweep(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory):
    if not trainer_available():
        pytest.skip("the trainer (python -m scaling.train) does not run yet")
    root = tmp_path_factory.mktemp("sweep2")
    profile = root / "test-slurm.yaml"
    profile.write_text(PROFILE)
    the_plan = plan(sweep_spec(profile, "slurm2", steps=12, walltime="00:05:00"), output_dir=root / "out")
    assert [(p.ranks, p.global_batch) for p in the_plan.points] == [(1, 4), (2, 8)]
    manifest = submit(the_plan, env=job_env(slurm_cluster))
    assert all(r.state == "submitted" and r.job_id for r in manifest.points.values())
    manifest = wait(the_plan.output_dir, timeout=900, poll_s=1, env=slurm_cluster.env)
    return the_plan, manifest, collect(the_plan.output_dir)


@pytest.mark.slow
def test_real_two_point_sweep_is_collected_with_throughput(two_point_sweep) -> None:
    the_plan, manifest, result = two_point_sweep
    logs = "\n".join(p.read_text()[-2000:] for p in (the_plan.output_dir / "logs").glob("*.out"))
    assert {r.state for r in manifest.points.values()} == {"complete"}, logs
    assert result.problems == [], [str(p) for p in result.problems]
    table = result.table.sort_values("ranks")
    assert list(table["ranks"]) == [1, 2] and list(table["measured_ranks"]) == [1, 2]
    assert list(table["global_batch"]) == [4, 8] and list(table["measured_global_batch"]) == [4, 8]
    assert (table["images_per_s"] > 0).all() and (table["ci95_low"] <= table["images_per_s"]).all()
    assert (table["steps_done"] == 12).all() and (table["step_records"] == table["ranks"] * 12).all()
    # The job ids in the table are the ones Slurm gave, and Slurm ran each job under its own id.
    for rec in manifest.points.values():
        assert (the_plan.output_dir / "logs" / f"{rec.attempts[0].job_name}-{rec.job_id}.out").exists()


@pytest.mark.slow
def test_walltime_signal_checkpoint_and_resubmission(slurm_cluster: SlurmCluster, two_point_sweep,
                                                     tmp_path: Path) -> None:
    """--time=1 min, --signal=B:USR1@15: slurmctld checks time limits every 30 s (PERIODIC_TIMEOUT) and sends USR1
    at the first check less than 15 + 30 s before the limit (sbatch(1), --signal: "up to 60 seconds earlier"), so
    15-45 s after the start, when the trainer is stepping (its first step ends a few seconds in); the trainer stops
    with a checkpoint (exit 75); resubmitted with more time and --resume, the point completes every planned step."""
    from larscale.runformat import read_steps, step_log_path

    _, manifest, calibration = two_point_sweep
    assert {r.state for r in manifest.points.values()} == {"complete"}, "the 2-point sweep failed"
    # Steps for 60 s at the fastest step the 2-rank point of the sweep took, so the work surely outlasts the latest
    # signal, 45 s after the start (its median includes the slow first steps: sized on it, the run could end
    # before the signal). The work is most of the test's time: the steps after the signal are the resumed job's.
    two_ranks = Path(calibration.table.sort_values("ranks")["run_dir"].iloc[-1])
    step_s = min(r["step_s"] for rank in (0, 1) for r in read_steps(step_log_path(two_ranks, rank)))
    steps = max(400, math.ceil(60.0 / step_s))
    profile = tmp_path / "test-slurm.yaml"
    profile.write_text(PROFILE)
    spec = sweep_spec(profile, "signal", steps=steps, walltime="00:01:00", checkpoint_every=10**6, log_every=10**6)
    spec["sweep"]["ranks_per_node"] = [2]
    spec["job"]["signal_s"] = 15
    short = plan(spec, output_dir=tmp_path / "out")
    (point,) = short.points
    script = submit(short, env=job_env(slurm_cluster)).points[point.point_id].script
    assert "#SBATCH --time=00:01:00" in Path(script).read_text()
    assert "#SBATCH --signal=B:USR1@15" in Path(script).read_text()
    first = wait(short.output_dir, timeout=400, poll_s=1, env=slurm_cluster.env).points[point.point_id]
    log = "\n".join(p.read_text()[-3000:] for p in (short.output_dir / "logs").glob("*.out"))
    assert first.state == "interrupted" and first.exit_status == 75, (first, log)
    summary = json.loads((Path(first.run_dir) / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps_done"] < steps
    assert summary["checkpoint"] and Path(summary["checkpoint"]).exists()
    done_before = summary["steps_done"]

    spec["job"]["walltime"] = "00:19:00"      # the queue's limit: room for the rest at any plausible pace
    longer = plan(spec, output_dir=tmp_path / "out")
    manifest = submit(longer, env=job_env(slurm_cluster))
    rec = manifest.points[point.point_id]
    assert len(rec.attempts) == 2 and rec.attempts[-1].resume and rec.script.endswith(".try2.sh")
    assert ' resume "${larscale_argv[@]}"' in Path(rec.script).read_text()       # launched with --resume
    final = wait(longer.output_dir, timeout=1500, poll_s=1, env=slurm_cluster.env).points[point.point_id]
    log = "\n".join(p.read_text()[-3000:] for p in (longer.output_dir / "logs").glob("*.out"))
    assert final.state == "complete" and final.exit_status == 0, (final, log)
    summary = json.loads((Path(final.run_dir) / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps_done"] == steps
    # Resumed, not restarted: the second job logged only the steps after the checkpoint.
    steps_logged = [json.loads(line)["step"] for line in
                    (Path(final.run_dir) / "steps" / "rank-00000.jsonl").read_text().splitlines()]
    assert min(steps_logged[-(steps - done_before):]) >= done_before - 1
    result = collect(longer.output_dir)
    assert result.table.loc[0, "state"] == "complete" and result.table.loc[0, "images_per_s"] > 0
    # One complete point: one row, no problem, every step once per rank (the redone steps replaced, not doubled).
    assert len(result.table) == 1 and result.problems == [], [str(p) for p in result.problems]
    assert result.table.loc[0, "steps_done"] == steps and result.table.loc[0, "step_records"] == 2 * steps


# ------------------------------------------------------------------------------------------ healing (issue #17)


@pytest.fixture(scope="module")
def slurm_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not trainer_available():
        pytest.skip("the trainer (python -m scaling.train) does not run yet")
    path = tmp_path_factory.mktemp("profile") / "test-slurm.yaml"
    path.write_text(PROFILE)
    return path


@pytest.mark.slow
def test_rank_killed_twice_inside_sbatch_heals_bitwise(slurm_cluster: SlurmCluster, slurm_profile: Path,
                                                       references: dict[str, Path], tmp_path: Path) -> None:
    """The retry loop of the batch script itself: rank 1 SIGKILLed twice after a checkpoint, inside sbatch."""
    from tests.test_jobs_faults import STEPS, Killer, assert_same_training, fault_spec, reference_run, report_figures

    reference = reference_run(references, "horovod")      # the local fault tests' run, where they ran first
    the_plan = plan(fault_spec("heal-slurm", machine=str(slurm_profile)), output_dir=tmp_path / "sweep")
    (point,) = the_plan.points
    killer = Killer(the_plan.run_dir(point), the_plan.output_dir, point.point_id)
    killer.start()
    manifest = submit(the_plan, env=job_env(slurm_cluster))
    job_id = manifest.points[point.point_id].job_id
    rec = wait(the_plan.output_dir, timeout=900, poll_s=1, env=slurm_cluster.env).points[point.point_id]
    log = "\n".join(p.read_text() for p in (the_plan.output_dir / "logs").glob("*.out"))
    assert killer.error is None and len(killer.killed_at) == 2, (killer, log[-6000:])
    assert rec.state == "complete" and rec.exit_status == 0, (rec, log[-6000:])
    # Three launches, all inside the one Slurm job.
    assert [(a.number, a.cause, a.job_id) for a in rec.attempts] == [(1, "submitted", job_id), (2, "retry", job_id),
                                                                      (3, "retry", job_id)]
    assert rec.attempts[-1].steps_reached == STEPS and all(a.time_lost_s > 0 for a in rec.attempts[:2])
    assert slurm_cluster.job_state(job_id) == ("COMPLETED", "0:0")
    assert_same_training(the_plan.run_dir(point), reference)
    report_figures("slurm horovod", killer, the_plan.output_dir, point.point_id)


def _requeue(cluster: SlurmCluster, job_id: str, timeout: float = 120) -> None:
    """`scontrol requeue`, then make the requeued job eligible at once (Slurm holds a requeued job back for
    about two minutes: its BeginTime is set ahead)."""
    cluster.run(["scontrol", "requeue", job_id])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, _ = cluster.job_state(job_id)
        if state == "PENDING":
            if cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False).returncode == 0:
                return
        elif state == "RUNNING" and cluster.run(["scontrol", "-o", "show", "job", job_id]).stdout.count(
                "Restarts=1"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} was not requeued\n{cluster.logs()}")


@pytest.mark.slow
def test_scontrol_requeue_resumes_and_completes_once(slurm_cluster: SlurmCluster, slurm_profile: Path,
                                                     tmp_path: Path) -> None:
    from jobs.attempts import read_launches, records_path
    from larscale.runformat import read_steps, step_log_path
    from scaling import checkpoint as ckpt
    from tests.test_jobs_faults import fault_spec

    steps, every = 1500, 50
    spec = fault_spec("requeue", machine=str(slurm_profile))
    spec["training"].update(steps=steps, checkpoint_every=every)
    the_plan = plan(spec, output_dir=tmp_path / "sweep")
    (point,) = the_plan.points
    run_dir = the_plan.run_dir(point)
    manifest = submit(the_plan, env=job_env(slurm_cluster))
    job_id = manifest.points[point.point_id].job_id
    deadline = time.monotonic() + 300
    while not ckpt.checkpoint_path(run_dir, 2 * every).exists():
        assert time.monotonic() < deadline and slurm_cluster.job_state(job_id)[0] in ("PENDING", "RUNNING")
        time.sleep(0.05)
    _requeue(slurm_cluster, job_id)
    rec = wait(the_plan.output_dir, timeout=900, poll_s=1, env=slurm_cluster.env).points[point.point_id]
    log = "\n".join(p.read_text() for p in (the_plan.output_dir / "logs").glob("*.out"))
    assert rec.state == "complete" and rec.exit_status == 0, (rec, log[-6000:])
    # Two launches in one Slurm job: the first cut by the requeue, the second resumed and finished.
    launches = read_launches(records_path(the_plan.output_dir, point.point_id))
    assert [(x.attempt, x.job, x.requeue, x.resume) for x in launches] == [(1, job_id, False, False),
                                                                          (2, job_id, True, True)], log[-6000:]
    assert launches[0].exit_status != 0 and launches[1].exit_status == 0
    assert [(a.number, a.cause) for a in rec.attempts] == [(1, "submitted"), (2, "requeue")]
    assert "DUE TO JOB REQUEUE" in log and log.count("complete: 1500 steps") == 1     # the log kept both runs
    # Resumed from a checkpoint, not rerun: every step once per rank; the summary names the checkpoint.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps_done"] == steps
    assert summary.get("resumed_from"), summary
    for rank in (0, 1):
        assert [r["step"] for r in read_steps(step_log_path(run_dir, rank))] == list(range(steps))
    assert "Restarts=1" in slurm_cluster.run(["scontrol", "-o", "show", "job", job_id]).stdout
    status = subprocess.run([sys.executable, "-m", "larscale", "sweep", "status", str(the_plan.output_dir)],
                            capture_output=True, text=True, env=slurm_cluster.env)
    assert "2 (1 requeue)" in status.stdout, status.stdout
    result = collect(the_plan.output_dir)
    assert result.problems == [] and int(result.table.loc[0, "requeues"]) == 1, [str(p) for p in result.problems]


@pytest.mark.slow
def test_ddp_points_start_under_srun_and_torchrun(slurm_cluster: SlurmCluster, slurm_profile: Path,
                                                  tmp_path: Path) -> None:
    """training.backend: ddp in a real sbatch: ranks placed by srun (SLURM_PROCID, MASTER_ADDR/MASTER_PORT from
    the script) and by torchrun (its own rendezvous on the allocation's first host)."""
    from tests.test_jobs_faults import fault_spec

    plans = []
    for launcher in ("srun", "torchrun"):
        spec = fault_spec(f"ddp-{launcher}", machine=str(slurm_profile), backend="ddp", launcher=launcher)
        spec["training"].update(steps=12, checkpoint_every=4)
        the_plan = plan(spec, output_dir=tmp_path / launcher)
        script = Path(submit(the_plan, env=job_env(slurm_cluster)).points[the_plan.points[0].point_id].script)
        assert "--backend ddp" in script.read_text() and "export MASTER_PORT=" in script.read_text()
        plans.append(the_plan)
    for the_plan in plans:
        (rec,) = wait(the_plan.output_dir, timeout=600, poll_s=1, env=slurm_cluster.env).points.values()
        log = "\n".join(p.read_text() for p in (the_plan.output_dir / "logs").glob("*.out"))
        # Complete in one launch: a DDP rank used to abort at exit after completing ("terminate called without an
        # active exception", exit 134) while its reducer still held the process group; the trainer now lets go of
        # the model before it tears the group down.
        assert rec.state == "complete" and [a.exit_status for a in rec.attempts] == [0], (rec, log[-6000:])
        summary = json.loads((Path(rec.run_dir) / "summary.json").read_text())
        assert (summary["status"], summary["ranks"], summary["steps_done"]) == ("complete", 2, 12), log[-3000:]
