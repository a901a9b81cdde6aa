"""`larscale train --compile`: torch.compile on CPU (inductor with the system's C++ compiler), real ranks.

The compiled run must train like the eager one (same losses within fp32 tolerance: inductor fuses and reorders
arithmetic), and the summary must say whether Horovod's allreduces could still overlap backward: eager gradients
arrive over most of backward, a compiled backward hands them all over at its end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from larscale.runformat import read_steps, step_log_path
from tests.conftest import REPO, run_ranks

ARGS = ["--model", "tiny", "--dataset", "digits", "--image-size", "16", "--batch-per-rank", "8", "--steps", "6",
        "--optimizer", "lars", "--lr", "0.3", "--warmup-steps", "2", "--no-eval", "--threads", "1",
        "--measure-warmup-steps", "2"]


@pytest.mark.slow
def test_compiled_run_trains_like_eager_and_reports_no_overlap(tmp_path: Path) -> None:
    run_ranks(2, ["-m", "scaling.train", *ARGS, "--out", str(tmp_path / "eager")], timeout=300)
    run_ranks(2, ["-m", "scaling.train", *ARGS, "--compile", "--out", str(tmp_path / "compiled")], timeout=900)
    for rank in (0, 1):
        eager = [r["loss"] for r in read_steps(step_log_path(tmp_path / "eager", rank))]
        compiled = [r["loss"] for r in read_steps(step_log_path(tmp_path / "compiled", rank))]
        np.testing.assert_allclose(compiled, eager, rtol=1e-4)
        assert max(eager) - min(eager) > 1e-3  # the losses moved: the comparison is not vacuous
    eager_backend = json.loads((tmp_path / "eager" / "summary.json").read_text())["backend"]
    compiled_backend = json.loads((tmp_path / "compiled" / "summary.json").read_text())["backend"]
    assert eager_backend["compiled"] is False and compiled_backend["compiled"] is True
    assert eager_backend["allreduce_overlap"] == "layerwise", eager_backend
    assert compiled_backend["allreduce_overlap"] == "none", compiled_backend
    assert compiled_backend["grad_ready_spread"] < eager_backend["grad_ready_spread"]


def test_compile_without_a_compiler_is_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler")}
    proc = subprocess.run([sys.executable, "-m", "scaling.train", *ARGS, "--compile", "--out", str(tmp_path / "r")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"larscale train: error: --compile: no C++ compiler found ({tmp_path / 'no-such-compiler'}): inductor "
        "compiles CPU kernels with one; install g++ (or set CXX), or drop --compile"]
    assert not (tmp_path / "r" / "steps").exists()


def test_compile_is_pytorch_only(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "scaling.train", "--framework", "tensorflow", "--compile",
                           "--out", str(tmp_path / "r")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--compile is torch.compile (PyTorch)" in proc.stderr
    assert "Traceback" not in proc.stderr
