"""`larscale train` on a CUDA device: eager and compiled, Horovod (NCCL when built with it) and DDP (NCCL).

Marked ``gpu``: skipped on machines without CUDA (CI never needs a GPU); benchmarks/gpu_check.sh runs them on a lent
GPU machine. One rank each (one GPU), the tiny network on digits, bf16 autocast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from larscale.runformat import read_steps, step_log_path, validate_step, validate_summary
from scaling.launch import local_env
from tests.conftest import REPO

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ARGS = ["--model", "tiny", "--dataset", "digits", "--image-size", "16", "--batch-per-rank", "64", "--steps", "40",
        "--device", "cuda", "--precision", "bf16", "--optimizer", "lars", "--lr", "0.2", "--threads", "2",
        "--measure-warmup-steps", "5"]


def train(args: list[str], out: Path, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, "-m", "scaling.train", *args, "--out", str(out)], cwd=REPO,
                          env=local_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = validate_summary(json.loads((out / "summary.json").read_text()))
    records = read_steps(step_log_path(out, 0))
    assert [r["step"] for r in records] == list(range(40))
    for record in records:
        validate_step(record)
        # Phases are CUDA-event intervals inside the step's own interval.
        assert record["data_s"] + record["compute_s"] + record["allreduce_s"] + record["optimizer_s"] \
            <= record["step_s"] * 1.001
    assert summary["device"] == "cuda" and summary["backend"]["device"].startswith("cuda")
    return summary


@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_cuda_run_eager(tmp_path: Path, backend: str) -> None:
    summary = train([*ARGS, "--backend", backend], tmp_path / backend)
    assert summary["communication"] == backend
    if backend == "ddp":
        assert summary["backend"]["process_group"] == "nccl"
    assert summary["eval"]["top1"] > 0.3  # 40 steps of 64 digits learn something (chance: 0.1)


def test_cuda_run_compiled(tmp_path: Path) -> None:
    summary = train([*ARGS, "--compile"], tmp_path / "compiled", timeout=900)
    assert summary["backend"]["compiled"] is True and summary["backend"]["allreduce_overlap"] in ("none", "layerwise")
