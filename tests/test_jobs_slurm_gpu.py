"""jobs/ on a real one-node Slurm whose node has 4 GPUs as count-only GRES (tests/slurm_cluster.py), and a walltime
chain of two dependent jobs run to completion.

- a GPU sweep is accepted: `scontrol show job` shows the GPUs per node and the cores per task the profile asked
  for; a CPU sweep on the same cluster asks for no GPU;
- a two-job chain (job.chain: 2, `--dependency=afterany`): the first job is stopped by the walltime signal after a
  checkpoint (`scancel --signal=USR1 --batch`, what Slurm's --signal sends), exits 75, and the second job starts
  after it and resumes the run to completion, every step done once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.submit import submit, wait
from jobs.sweep import plan
from tests import slurm_cluster as _slurm
from tests.slurm_cluster import SlurmCluster
from tests.test_jobs_slurm import PROFILE, job_env, trainer_available

slurm_gpu_cluster = _slurm.slurm_gpu_cluster

pytestmark = [pytest.mark.slurm]

GPU_PROFILE = PROFILE.replace("name: test-slurm", "name: test-slurm-gpu").replace(
    "devices: {kind: cpu, model: test core, count: 2, peak_tflops: {fp32: 0.1}}",
    "devices: {kind: gpu, model: test GPU, count: 2, peak_tflops: {fp32: 1.0, bf16: 4.0}}")


def scontrol_fields(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    out = cluster.run(["scontrol", "-o", "show", "job", job_id]).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def spec(profile: Path, name: str, **job) -> dict:
    return {"name": name, "model": "tiny", "framework": "torch", "dataset": "synthetic", "machine": str(profile),
            "sweep": {"kind": "weak", "nodes": [1], "batch_per_rank": 4},
            "training": {"steps": 5, "optimizer": "sgd", "lr": 0.1, "image_size": 16, "num_classes": 10,
                         "extra_args": ["--no-eval"]},
            "job": {"walltime": "00:05:00", "max_retries": 0, **job}}


def test_gpu_sweep_is_accepted_with_its_gpus_and_cores(slurm_gpu_cluster: SlurmCluster, tmp_path: Path) -> None:
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text(GPU_PROFILE)
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text(PROFILE)
    gpu_plan = plan(spec(gpu, "gpu"), output_dir=tmp_path / "gpu")
    cpu_plan = plan(spec(cpu, "cpu"), output_dir=tmp_path / "cpu")
    (point,) = gpu_plan.points
    assert (point.ranks_per_node, point.threads_per_rank, gpu_plan.precision) == (2, 1, "bf16")
    gpu_job = submit(gpu_plan, env=slurm_gpu_cluster.env).points[point.point_id].job_id
    cpu_job = submit(cpu_plan, env=slurm_gpu_cluster.env).points[cpu_plan.points[0].point_id].job_id
    fields = scontrol_fields(slurm_gpu_cluster, gpu_job)
    assert fields.get("TresPerNode") == "gres:gpu:2", fields      # --gpus-per-node=2: one per rank
    assert fields.get("CPUs/Task") == "1" and fields.get("NumTasks", fields.get("NumCPUs")) == "2", fields
    cpu_fields = scontrol_fields(slurm_gpu_cluster, cpu_job)
    assert "gpu" not in cpu_fields.get("TresPerNode", "") and "gpu" not in cpu_fields.get("TRES", ""), cpu_fields
    for job_id in (gpu_job, cpu_job):
        slurm_gpu_cluster.wait_job(job_id, timeout=300)
    # Slurm ran the GPU job (no device here: the trainer refuses --device cuda with a usage error, exit 2).
    assert slurm_gpu_cluster.job_state(gpu_job)[0] in ("COMPLETED", "FAILED")


@pytest.mark.slow
def test_two_job_chain_resumes_and_completes(slurm_gpu_cluster: SlurmCluster, tmp_path: Path) -> None:
    if not trainer_available():
        pytest.skip("the trainer (python -m scaling.train) does not run yet")
    from jobs.attempts import read_launches, records_path
    from larscale.runformat import read_steps, step_log_path
    from scaling import checkpoint as ckpt

    profile = tmp_path / "cpu.yaml"
    profile.write_text(PROFILE)
    # Each job has the queue's 15 minutes: the second must not meet its own walltime signal on a loaded machine.
    steps, every = 600, 50
    chain = spec(profile, "chain", chain=2, max_retries=2, walltime="00:15:00")
    chain["sweep"].update(ranks_per_node=[2], threads_per_rank=1)
    chain["training"].update(steps=steps, checkpoint_every=every, optimizer="lars", warmup_steps=0)
    the_plan = plan(chain, output_dir=tmp_path / "sweep")
    (point,) = the_plan.points
    rec = submit(the_plan, env=job_env(slurm_gpu_cluster)).points[point.point_id]
    first, second = rec.chain
    assert "Dependency=afterany:" + first in " ".join(
        f"{k}={v}" for k, v in scontrol_fields(slurm_gpu_cluster, second).items()), "no dependency"
    run_dir = the_plan.run_dir(point)
    deadline = time.monotonic() + 300
    while not ckpt.checkpoint_path(run_dir, 2 * every).exists():
        assert time.monotonic() < deadline, slurm_gpu_cluster.logs()
        time.sleep(0.1)
    # What --signal=B:USR1@N sends at the walltime: the script forwards it, the ranks checkpoint and exit 75.
    slurm_gpu_cluster.run(["scancel", "--signal=USR1", "--batch", first])
    done = wait(the_plan.output_dir, timeout=900, poll_s=1, env=slurm_gpu_cluster.env).points[point.point_id]
    log = "\n".join(p.read_text() for p in (the_plan.output_dir / "logs").glob("*.out"))
    jobs = {j: scontrol_fields(slurm_gpu_cluster, j) for j in (first, second)}
    for j, f in jobs.items():
        print(j, {k: f.get(k) for k in ("JobState", "Reason", "Dependency", "ExitCode", "StartTime", "EndTime")})
    assert done.state == "complete" and done.exit_status == 0, (
        done.state, done.reason, done.chain, {j: (f.get("JobState"), f.get("Reason"), f.get("Dependency"))
                                               for j, f in jobs.items()}, log[-3000:])
    launches = read_launches(records_path(the_plan.output_dir, point.point_id))
    assert [(x.job, x.exit_status, x.resume) for x in launches] == [(first, 75, False), (second, 0, True)], log[-4000:]
    one, two = scontrol_fields(slurm_gpu_cluster, first), scontrol_fields(slurm_gpu_cluster, second)
    assert two["StartTime"] >= one["EndTime"]              # the second job waited for the first
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps_done"] == steps and summary.get("resumed_from")
    for rank in (0, 1):
        assert [r["step"] for r in read_steps(step_log_path(run_dir, rank))] == list(range(steps))
    status = subprocess.run([sys.executable, "-m", "larscale", "sweep", "status", str(the_plan.output_dir),
                             "--format", "json"], capture_output=True, text=True, env=slurm_gpu_cluster.env)
    (row,) = json.loads(status.stdout)["points"]
    assert row["state"] == "complete" and row["chain"] == [first, second]
