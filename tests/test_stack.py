"""The distributed stack itself: real Open MPI ranks, real Horovod (MPI and Gloo), mpi4py, bootstrap."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_ranks, tagged_json


@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_horovod_allreduce_and_broadcast_both_frameworks(controller: str) -> None:
    proc = run_ranks(2, ["-m", "scaling.smoke", "--frameworks", "torch,tensorflow"], controller=controller)
    reports = tagged_json(proc.stdout, "SMOKE")
    assert sorted((r["framework"], r["rank"]) for r in reports) == [
        ("tensorflow", 0), ("tensorflow", 1), ("torch", 0), ("torch", 1)]
    for r in reports:
        assert r["size"] == 2 and r["controller"] == controller
        # rank 0 sends 1·[1,2,3], rank 1 sends 2·[1,2,3]: the sum is exactly 3·[1,2,3].
        assert r["sum"] == [3.0, 6.0, 9.0]
        assert r["sum_ok"] and r["mean_ok"] and r["broadcast_ok"], r


def test_mpi4py_allreduce_two_ranks() -> None:
    code = ("from mpi4py import MPI; import numpy as np; c = MPI.COMM_WORLD; "
            "x = np.arange(5, dtype=np.float64) * (c.rank + 1); y = np.empty_like(x); "
            "c.Allreduce(x, y, op=MPI.SUM); import sys; sys.stdout.write(f'MPI4PY {c.rank} {c.size} {y.tolist()}\\n')")
    proc = run_ranks(2, ["-c", code])
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("MPI4PY"))
    assert lines == ["MPI4PY 0 2 [0.0, 3.0, 6.0, 9.0, 12.0]", "MPI4PY 1 2 [0.0, 3.0, 6.0, 9.0, 12.0]"]


def test_horovod_build_lists_frameworks_and_controllers() -> None:
    # What `horovodrun --check-build` lists, asked of Horovod's own API in a third of the time: the line
    # bootstrap.sh ends with (tools/horovod_installed.py).
    proc = subprocess.run([sys.executable, "-m", "tools.horovod_build", "verify", "--report"], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert ("Horovod 0.28.1: frameworks PyTorch, TensorFlow; controllers MPI, Gloo; GPU operations none"
            in proc.stderr), proc.stderr


def test_smoke_subcommand_reports_ranks() -> None:
    proc = subprocess.run([sys.executable, "-m", "larscale", "smoke", "-np", "2", "--frameworks", "torch"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "smoke run passed: 2 ranks, controller mpi" in proc.stdout


def test_smoke_rejects_zero_ranks() -> None:
    proc = subprocess.run([sys.executable, "-m", "larscale", "smoke", "-np", "0"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "--ranks must be at least 1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bootstrap_is_idempotent() -> None:
    """A second bootstrap finds everything in place: it neither rebuilds nor reinstalls Horovod."""
    import horovod

    marker = os.path.getmtime(horovod.__file__)
    proc = subprocess.run(["bash", str(REPO / "bootstrap.sh")], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "LARSCALE_BOOTSTRAP_QUIET": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "building Horovod" not in proc.stderr
    assert "installing" not in proc.stderr, proc.stderr
    assert os.path.getmtime(horovod.__file__) == marker
