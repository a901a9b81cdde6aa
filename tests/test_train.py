"""`larscale train`: real 2-rank Horovod runs (mpirun and horovodrun --gloo) on CPU, small and quick.

The equivalence tests use the trainer's ``tiny`` network (2 conv + linear, no BatchNorm, no dropout): with
BatchNorm each rank normalises with its own batch statistics, so 2 ranks × b and 1 rank × 2b would differ by
design, not by a bug. The data is ``digits`` (real data whose global batch is the same set of samples
whatever the rank count, see scaling/data.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from larscale.runformat import EXIT_RESUMABLE, read_steps, step_log_path, validate_step, validate_summary
from scaling import checkpoint as ckpt
from scaling.launch import local_env, rank_command
from tests.conftest import REPO, rank_processes, run_ranks

PROGRAM = os.environ.get("LARSCALE_TEST_TRAIN_PROGRAM", "-m scaling.train").split()
TINY = ["--model", "tiny", "--dataset", "digits", "--image-size", "16", "--no-eval"]


def train(ranks: int, args: list[str], controller: str = "mpi", check: bool = True,
          timeout: float = 240) -> subprocess.CompletedProcess:
    return run_ranks(ranks, [*PROGRAM, *args], controller=controller, timeout=timeout, check=check)


def torch_weights(run_dir: Path) -> dict[str, np.ndarray]:
    import torch

    path, state = ckpt.latest(run_dir, load=lambda f: torch.load(f, map_location="cpu", weights_only=False))
    return {k: v.numpy() for k, v in state["model"].items()}


def tf_weights(run_dir: Path) -> dict[str, np.ndarray]:
    path, state = ckpt.latest(run_dir)
    return {str(i): w for i, w in enumerate(state["model"])}


@pytest.mark.parametrize(("framework", "optimizer", "controller"), [
    ("torch", "sgd", "mpi"), ("torch", "lars", "gloo"), ("tensorflow", "sgd", "gloo"),
    ("tensorflow", "lars", "mpi")])
def test_two_ranks_equal_one_rank_with_double_batch(tmp_path: Path, framework: str, optimizer: str,
                                                    controller: str) -> None:
    """Two steps on 2 ranks × 4 give the weights of 2 steps on 1 rank × 8 (fp32 rounding apart)."""
    common = [*TINY, "--framework", framework, "--optimizer", optimizer, "--steps", "2", "--lr", "0.5",
              "--weight-decay", "1e-3", "--threads", "1", "--checkpoint-every", "1", "--end-lr", "0.25"]
    train(2, [*common, "--batch-per-rank", "4", "--out", str(tmp_path / "two")], controller=controller)
    train(1, [*common, "--batch-per-rank", "8", "--out", str(tmp_path / "one")], controller=controller)
    load = torch_weights if framework == "torch" else tf_weights
    two, one = load(tmp_path / "two"), load(tmp_path / "one")
    assert two.keys() == one.keys()
    for name in two:
        np.testing.assert_allclose(two[name], one[name], rtol=2e-5, atol=2e-6, err_msg=name)
    # The second step moved the weights (else the comparison would be vacuous): step-1 checkpoint vs final.
    after_first = load_step(framework, tmp_path / "one", 1)
    assert max(float(np.abs(one[k] - after_first[k]).max()) for k in one) > 1e-4


def load_step(framework: str, run_dir: Path, step: int) -> dict[str, np.ndarray]:
    path = ckpt.checkpoint_path(run_dir, step)
    if framework == "torch":
        import torch

        return {k: v.numpy() for k, v in torch.load(path, map_location="cpu", weights_only=False)["model"].items()}
    with open(path, "rb") as handle:
        return {str(i): w for i, w in enumerate(pickle.load(handle)["model"])}


def test_synthetic_run_writes_valid_step_log_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(2, ["--model", "tiny", "--dataset", "synthetic", "--image-size", "16", "--batch-per-rank", "2",
              "--num-classes", "10", "--steps", "9", "--measure-warmup-steps", "3", "--optimizer", "sgd",
              "--out", str(out), "--checkpoint-every", "3", "--keep", "2"], controller="mpi")
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary)
    assert summary["status"] == "complete" and summary["ranks"] == 2 and summary["controller"] == "mpi"
    assert summary["steps_done"] == 9 and summary["warmup_steps_excluded"] == 3
    assert summary["global_batch"] == 4 and summary["eval"] is None
    tp = summary["throughput"]
    assert 0 < tp["ci95_low"] <= tp["images_per_s"] <= tp["ci95_high"]
    assert len(tp["per_rank_images_per_s"]) == 2
    for rank in (0, 1):
        records = read_steps(step_log_path(out, rank))
        assert [r["step"] for r in records] == list(range(9))
        for r in records:
            validate_step(r)
            assert r["rank"] == rank and r["ranks"] == 2
            parts = r["data_s"] + r["compute_s"] + r["allreduce_s"] + r["optimizer_s"]
            assert parts <= r["step_s"] * 1.0001
    # checkpoints at 3 and 6 and the final one at 9; keep 2.
    assert [s for s, _ in ckpt.listed(out)] == [6, 9]
    assert summary["checkpoint"].endswith("ckpt-00000009.pt")


def test_validators_reject_broken_records() -> None:
    good = {"step": 0, "epoch": 0, "rank": 0, "ranks": 2, "batch_per_rank": 2, "global_batch": 4, "data_s": 0.0,
            "compute_s": 0.1, "allreduce_s": 0.01, "optimizer_s": 0.0, "step_s": 0.2, "images_per_s": 10.0,
            "lr": 0.1, "loss": 2.3, "time": 1.0}
    validate_step(good)
    for broken in ({**good, "rank": 2}, {**good, "data_s": -1.0}, {**good, "global_batch": 5},
                   {k: v for k, v in good.items() if k != "lr"}, {**good, "step": True}):
        with pytest.raises(ValueError):
            validate_step(broken)
    with pytest.raises(ValueError, match="summary lacks"):
        validate_summary({"schema": "larscale.run/1"})


def start_ranks(ranks: int, args: list[str], controller: str = "mpi") -> subprocess.Popen:
    """The ranks of a training run, started in their own session (so the test can kill the whole job)."""
    argv = rank_command(ranks, [sys.executable, *PROGRAM, *args], controller=controller)
    return subprocess.Popen(argv, env=local_env(threads_per_rank=1), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_steps(out: Path, rank: int, steps: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    path = step_log_path(out, rank)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"ranks exited ({proc.returncode}) before step {steps}:\n{proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"no step {steps} within {timeout} s")


# (framework, backend, launcher): the stop and the watchdog live in the shared lifecycle; each way of running proves it.
VARIANTS = [("torch", "horovod", "mpi"), ("tensorflow", "horovod", "mpi"), ("torch", "ddp", "torchrun")]


def assert_launcher_reports_resumable(proc: subprocess.Popen, controller: str, out: str, err: str) -> None:
    """mpirun passes the ranks' 75 on; torchrun turns any worker's non-zero exit into its own 1, naming it."""
    if controller == "torchrun":
        assert proc.returncode != 0 and f"exitcode  : {EXIT_RESUMABLE}" in out + err, (out[-2000:], err[-3000:])
    else:
        assert proc.returncode == EXIT_RESUMABLE, err[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(("framework", "backend", "controller"), VARIANTS)
def test_sigterm_then_resume_is_bitwise_equal_to_uninterrupted(tmp_path: Path, framework: str, backend: str,
                                                               controller: str) -> None:
    """Stop a 2-rank run by SIGTERM (sent to one rank, as a scheduler may), resume, compare to a straight run."""
    steps = 60
    common = [*TINY, "--batch-per-rank", "4", "--steps", str(steps), "--optimizer", "lars", "--lr", "0.2",
              "--warmup-steps", "10", "--deterministic", "--threads", "1", "--checkpoint-every", "25",
              "--framework", framework, "--backend", backend]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(2, [*common, "--out", str(straight)], controller=controller)

    proc = start_ranks(2, [*common, "--out", str(stopped)], controller=controller)
    try:
        wait_for_steps(stopped, 1, 12, proc)
        ranks = rank_processes(proc)
        assert sorted(ranks) == [0, 1], ranks
        ranks[1].send_signal(signal.SIGTERM)  # one rank only: the stop vote must stop both
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_launcher_reports_resumable(proc, controller, out, err)
    summary = validate_summary(json.loads((stopped / "summary.json").read_text()))
    assert summary["status"] == "interrupted"
    stopped_at = summary["steps_done"]
    assert 12 <= stopped_at < steps, stopped_at
    assert summary["checkpoint"].endswith(f"ckpt-{stopped_at:08d}.pt")

    train(2, [*common, "--out", str(stopped), "--resume"], controller=controller)
    resumed = validate_summary(json.loads((stopped / "summary.json").read_text()))
    assert resumed["status"] == "complete" and resumed["steps_done"] == steps
    assert resumed["resumed_from"].endswith(f"ckpt-{stopped_at:08d}.pt")
    load = torch_weights if framework == "torch" else tf_weights
    a, b = load(straight), load(stopped)
    for name in a:
        assert np.array_equal(a[name], b[name]), name  # bitwise
    for rank in (0, 1):
        lr_straight = [r["lr"] for r in read_steps(step_log_path(straight, rank))]
        lr_stopped = [r["lr"] for r in read_steps(step_log_path(stopped, rank))]
        loss_straight = [r["loss"] for r in read_steps(step_log_path(straight, rank))]
        loss_stopped = [r["loss"] for r in read_steps(step_log_path(stopped, rank))]
        assert lr_stopped == lr_straight and len(lr_straight) == steps
        assert loss_stopped == loss_straight


@pytest.mark.slow
def test_digits_two_ranks_learns(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    train(2, ["--model", "tiny", "--dataset", "digits", "--image-size", "16", "--batch-per-rank", "16",
              "--epochs", "4", "--optimizer", "sgd", "--lr", "0.1", "--out", str(out)], controller="gloo")
    summary = validate_summary(json.loads((out / "summary.json").read_text()))
    # Observed: top-1 0.958, top-5 1.000 after 4 epochs (chance is 0.1 and 0.5).
    assert summary["eval"]["top1"] >= 0.80, summary["eval"]
    assert summary["eval"]["top5"] >= 0.97, summary["eval"]
    assert summary["controller"] == "gloo"


@pytest.mark.slow
@pytest.mark.parametrize(("framework", "backend", "controller"), VARIANTS)
def test_hung_rank_trips_the_watchdog(tmp_path: Path, framework: str, backend: str, controller: str) -> None:
    """SIGSTOP one rank (alive but silent; no launcher notices): the other exits 70 after --stall-timeout."""
    out = tmp_path / "hung"
    stopped = None
    proc = start_ranks(2, [*TINY, "--batch-per-rank", "4", "--steps", "100000", "--optimizer", "sgd",
                           "--stall-timeout", "5", "--out", str(out), "--framework", framework, "--backend", backend],
                       controller=controller)
    try:
        wait_for_steps(out, 0, 5, proc)
        ranks = rank_processes(proc)
        assert sorted(ranks) == [0, 1], ranks
        stopped = ranks[1]
        stopped.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        ranks[0].wait(timeout=60)
        elapsed = time.monotonic() - stopped_at
        # The watchdog has done its part. A stopped rank cannot act on the launcher's SIGTERM: torchrun would wait
        # its 30 s grace before killing it; kill it now, as the launcher finally would.
        stopped.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        # torchrun starts its workers in sessions of their own: the stopped one outlives the job unless killed.
        if stopped is not None:
            with contextlib.suppress(psutil.Error):
                stopped.kill()
    assert proc.returncode != 0
    assert "a peer rank died or hangs" in err
    assert 4 < elapsed < 60


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "larscale", "train", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env=local_env(env, threads_per_rank=1))


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["--dataset", "cifar"], "unknown dataset 'cifar'"),
    (["--dataset", "imagenet:/no/such/dir"], "/no/such/dir does not exist"),
    (["--global-batch", "10", "--batch-per-rank", "4"], "disagree"),
    (["--global-batch", "10", "--accumulation", "3"], "not divisible by ranks × accumulation"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "cpu", "--precision", "fp16"], "fp16 needs --device cuda"),
    (["--model", "alexnet", "--image-size", "32"], "--model alexnet"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_cli(["--model", "tiny", "--steps", "1", "--out", str(tmp_path / "x"), *args])
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_global_batch_not_divisible_by_two_ranks(tmp_path: Path) -> None:
    proc = train(2, [*TINY, "--global-batch", "7", "--steps", "1", "--out", str(tmp_path / "x")], check=False)
    assert proc.returncode != 0
    assert "--global-batch 7 is not divisible by ranks × accumulation = 2 × 1" in proc.stderr


def test_imagenet_folder_run_and_eval(tmp_path: Path) -> None:
    """A tiny generated JPEG tree (3 classes): a 2-rank run with DataLoader workers reads it and evaluates."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("val", 2)):
        for c in range(3):
            folder = tmp_path / "imnet" / split / f"n0000{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(20 + 3 * i, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG")
    out = tmp_path / "run"
    train(2, ["--model", "tiny", "--dataset", f"imagenet:{tmp_path / 'imnet'}", "--image-size", "16",
              "--batch-per-rank", "2", "--epochs", "2", "--optimizer", "sgd", "--workers", "1",
              "--augmentation", "extended", "--out", str(out)])
    summary = validate_summary(json.loads((out / "summary.json").read_text()))
    assert summary["num_classes"] == 3 and summary["steps_per_epoch"] == 4 and summary["steps_done"] == 8
    assert summary["eval"] is not None and 0.0 <= summary["eval"]["top1"] <= 1.0
    assert summary["eval"]["top5"] == 1.0  # 3 classes: the top-5 holds them all


def test_checkpoint_latest_skips_incomplete_files(tmp_path: Path) -> None:
    ckpt.save(tmp_path, 5, {"w": [1, 2]}, keep=3)
    ckpt.save(tmp_path, 10, {"w": [3]}, keep=3)
    (ckpt.checkpoint_path(tmp_path, 15)).write_bytes(b"truncated")  # a torn copy under a final name
    with open(ckpt.checkpoint_path(tmp_path, 20), "wb") as handle:
        pickle.dump({"w": [9], "step": 20}, handle)  # no completion mark
    path, state = ckpt.latest(tmp_path)
    assert state["step"] == 10 and state["w"] == [3] and path.name == "ckpt-00000010.pt"
    ckpt.save(tmp_path, 25, {"w": []}, keep=2)
    assert [s for s, _ in ckpt.listed(tmp_path)] == [20, 25]


@pytest.mark.slow
def test_no_final_checkpoint_skips_only_the_complete_runs_last_one(tmp_path: Path) -> None:
    # A benchmark run keeps its periodic checkpoints and writes none at its end (AlexNet's is ~0.5 GB); the stop
    # by signal still checkpoints (tests below pass the flag to the start-up stop).
    out = tmp_path / "bench"
    train(1, [*TINY, "--batch-per-rank", "4", "--steps", "5", "--optimizer", "sgd", "--threads", "1",
              "--checkpoint-every", "3", "--no-final-checkpoint", "--out", str(out)])
    summary = validate_summary(json.loads((out / "summary.json").read_text()))
    assert summary["status"] == "complete" and summary["steps_done"] == 5
    assert [s for s, _ in ckpt.listed(out)] == [3] and summary["checkpoint"].endswith("ckpt-00000003.pt")


def test_stop_signal_during_start_up_is_a_stop_request(tmp_path: Path) -> None:
    """SIGUSR1 (Slurm's pre-walltime signal) reaching a rank while it still imports torch and joins the job: the
    handler is installed before anything heavy loads, so the run stops at its first step boundary with a
    checkpoint and exit 75 instead of the rank dying and its peer waiting for it."""
    out = tmp_path / "early"
    proc = start_ranks(2, [*TINY, "--batch-per-rank", "4", "--steps", "50", "--optimizer", "sgd", "--threads", "1",
                           "--no-final-checkpoint", "--out", str(out)])
    try:
        deadline = time.monotonic() + 60
        ranks: dict = {}
        while len(ranks) < 2 and time.monotonic() < deadline:
            ranks = rank_processes(proc)
            time.sleep(0.02)
        assert sorted(ranks) == [0, 1], ranks
        # Past the interpreter's start and the trainer's first lines (~0.1 s), long before torch and Horovod are up
        # (seconds). Timed from when the rank was first seen: psutil's create_time drifts from the wall clock on VMs.
        time.sleep(0.8)
        assert not step_log_path(out, 1).exists(), "too late: the rank is already training"
        ranks[1].send_signal(signal.SIGUSR1)
        out_text, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_RESUMABLE, err[-3000:]
    summary = validate_summary(json.loads((out / "summary.json").read_text()))
    assert summary["status"] == "interrupted" and 1 <= summary["steps_done"] < 50
    assert "stopped by SIGUSR1" in out_text or "stopped by a signal on another rank" in out_text
    # --no-final-checkpoint spares only a complete run's last checkpoint: the stopped run can resume.
    assert [s for s, _ in ckpt.listed(out)] == [summary["steps_done"]]
