"""`larscale train --backend ddp`: PyTorch's DistributedDataParallel through the same lifecycle, on real ranks.

Launchers: torchrun (rank from RANK/WORLD_SIZE, rendezvous at torchrun's MASTER_ADDR:MASTER_PORT) and mpirun (rank
from OMPI_COMM_WORLD_*, rendezvous address sent by MPI). The ``tiny`` network (no BatchNorm) on ``digits``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from larscale.runformat import read_steps, step_log_path, validate_step, validate_summary
from scaling import checkpoint as ckpt
from scaling.comm_ddp import launch_environment, rendezvous
from tests.conftest import REPO, run_ranks

TINY = ["--model", "tiny", "--dataset", "digits", "--image-size", "16", "--no-eval", "--threads", "1"]


def train(ranks: int, args: list[str], launcher: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_ranks(ranks, ["-m", "scaling.train", *args], controller=launcher, timeout=300, check=check)


def weights(run_dir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    import torch

    load = lambda f: torch.load(f, map_location="cpu", weights_only=False)  # noqa: E731
    if step is None:
        found = ckpt.latest(run_dir, load=load)
        assert found is not None, f"no checkpoint in {run_dir}"
        state = found[1]
    else:
        with open(ckpt.checkpoint_path(run_dir, step), "rb") as handle:
            state = load(handle)
    return {k: v.numpy() for k, v in state["model"].items()}


def losses(run_dir: Path, rank: int) -> list[float]:
    return [r["loss"] for r in read_steps(step_log_path(run_dir, rank))]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "mpi"])
def test_two_ranks_equal_one_rank_with_double_batch(tmp_path: Path, launcher: str) -> None:
    """Two steps on 2 ranks × 4 give the weights of 2 steps on 1 rank × 8 (fp32 rounding apart), as for Horovod."""
    common = [*TINY, "--backend", "ddp", "--optimizer", "lars", "--steps", "2", "--lr", "0.5", "--weight-decay",
              "1e-3", "--checkpoint-every", "1", "--end-lr", "0.25"]
    train(2, [*common, "--batch-per-rank", "4", "--out", str(tmp_path / "two")], launcher)
    train(1, [*common, "--batch-per-rank", "8", "--out", str(tmp_path / "one")], launcher)
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert two.keys() == one.keys()
    for name in two:
        np.testing.assert_allclose(two[name], one[name], rtol=2e-5, atol=2e-6, err_msg=name)
    after_first = weights(tmp_path / "one", 1)
    assert max(float(np.abs(one[k] - after_first[k]).max()) for k in one) > 1e-4  # the second step moved them
    summary = validate_summary(json.loads((tmp_path / "two" / "summary.json").read_text()))
    assert summary["communication"] == "ddp" and summary["controller"] == "gloo" and summary["ranks"] == 2
    assert summary["backend"]["process_group"] == "gloo"
    assert summary["backend"]["launcher"] == ("torchrun" if launcher == "torchrun" else "mpirun")
    for rank in (0, 1):
        for record in read_steps(step_log_path(tmp_path / "two", rank)):
            validate_step(record)
            assert record["data_s"] + record["compute_s"] + record["allreduce_s"] + record["optimizer_s"] \
                <= record["step_s"] * 1.0001


@pytest.mark.slow
def test_ddp_and_horovod_give_the_same_run(tmp_path: Path) -> None:
    """Same 2-rank run (accumulation 2, LARS, warm-up) through Horovod and through DDP: same losses step for step
    and the same weights. With 2 ranks the two averagings are the same arithmetic ((a + b)/2 and a/2 + b/2 differ
    by no rounding), so they agree bitwise."""
    common = [*TINY, "--batch-per-rank", "4", "--accumulation", "2", "--steps", "8", "--optimizer", "lars",
              "--lr", "0.3", "--warmup-steps", "3", "--deterministic", "--checkpoint-every", "4"]
    train(2, [*common, "--backend", "horovod", "--out", str(tmp_path / "hvd")], "mpi")
    train(2, [*common, "--backend", "ddp", "--out", str(tmp_path / "ddp")], "torchrun")
    for rank in (0, 1):
        assert losses(tmp_path / "ddp", rank) == losses(tmp_path / "hvd", rank)
    a, b = weights(tmp_path / "hvd"), weights(tmp_path / "ddp")
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.slow
def test_a_horovod_checkpoint_resumes_under_ddp_and_back(tmp_path: Path) -> None:
    """Stop after 6 of 12 steps under Horovod, resume under DDP to step 9, resume under Horovod to the end: the
    weights and every step's loss equal the uninterrupted Horovod run's (checkpoints are the same format)."""
    common = [*TINY, "--batch-per-rank", "4", "--optimizer", "lars", "--lr", "0.2", "--warmup-steps", "3",
              "--deterministic", "--checkpoint-every", "3"]
    straight, mixed = tmp_path / "straight", tmp_path / "mixed"
    train(2, [*common, "--steps", "12", "--out", str(straight)], "mpi")
    shutil.copytree(straight, mixed)

    def keep_only(step: int) -> None:  # as if the run had stopped right after that checkpoint
        for saved_step, path in ckpt.listed(mixed):
            if saved_step != step:
                path.unlink()

    keep_only(6)
    train(2, [*common, "--steps", "12", "--backend", "ddp", "--resume", "--out", str(mixed)], "torchrun")
    keep_only(9)
    train(2, [*common, "--steps", "12", "--backend", "horovod", "--resume", "--out", str(mixed)], "mpi")
    summary = json.loads((mixed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("ckpt-00000009.pt") and summary["communication"] == "horovod"
    a, b = weights(straight), weights(mixed)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    for rank in (0, 1):
        assert losses(mixed, rank) == losses(straight, rank)


def test_launch_environment_reads_each_launcher() -> None:
    torchrun = launch_environment({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (torchrun.launcher, torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.local_size) == \
        ("torchrun", 1, 4, 1, 2)
    openmpi = launch_environment({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
                                  "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (openmpi.launcher, openmpi.rank, openmpi.local_rank) == ("mpirun", 3, 1)
    srun = launch_environment({"SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4",
                               "SLURM_LOCALID": "0", "SLURM_NTASKS": "4"})
    assert (srun.launcher, srun.rank, srun.world_size, srun.local_rank, srun.local_size) == ("srun", 2, 4, 0, None)
    # A batch script's own shell is not an srun step: it is one process, whatever the job's task count.
    assert launch_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}).world_size == 1
    assert launch_environment({}).launcher == "none"


def test_launch_environment_and_rendezvous_errors_name_the_variable() -> None:
    from larscale import UsageError

    with pytest.raises(UsageError, match="horovodrun"):
        launch_environment({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"})
    with pytest.raises(UsageError, match="RANK=5 is not below WORLD_SIZE=2"):
        launch_environment({"RANK": "5", "WORLD_SIZE": "2"})
    with pytest.raises(UsageError, match="WORLD_SIZE='two'"):
        launch_environment({"RANK": "0", "WORLD_SIZE": "two"})
    srun = launch_environment({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        rendezvous(srun, {})
    assert rendezvous(srun, {"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}) == "env://"


def test_ddp_refusals_are_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "HOROVOD_RANK": "0", "HOROVOD_SIZE": "1"}
    proc = subprocess.run([sys.executable, "-m", "scaling.train", *TINY, "--backend", "ddp", "--steps", "1",
                           "--out", str(tmp_path / "r")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "larscale train: error: --backend ddp cannot run under horovodrun (it starts Horovod jobs); launch with "
        "torchrun, srun or mpirun, or use --backend horovod"]
    proc = subprocess.run([sys.executable, "-m", "scaling.train", "--framework", "tensorflow", "--backend", "ddp",
                           "--out", str(tmp_path / "t")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "TensorFlow runs use --backend horovod" in proc.stderr
    assert "Traceback" not in proc.stderr
