"""`larscale report` on a sweep that ran through the real one-node Slurm of tests/slurm_cluster.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from jobs.submit import submit, wait
from jobs.sweep import plan
from tests import slurm_cluster as _slurm
from tests.conftest import REPO
from tests.test_jobs_slurm import PROFILE
from tests.test_report import slowest_rank_mean_step, tree_hash

slurm_cluster = _slurm.slurm_cluster  # the module-scoped fixture, used by name below

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_report_of_a_slurm_sweep(slurm_cluster, tmp_path: Path) -> None:
    from scaling.launch import local_env

    profile = tmp_path / "test-slurm.yaml"
    profile.write_text(PROFILE)
    spec = {"name": "r50-slurm", "model": "resnet50", "framework": "torch", "dataset": "synthetic",
            "machine": str(profile),
            "sweep": {"kind": "weak", "nodes": [1], "ranks_per_node": [1, 2], "batch_per_rank": 2,
                      "threads_per_rank": 1},
            "training": {"steps": 6, "optimizer": "lars", "lr": 0.1, "image_size": 32, "num_classes": 10,
                         "extra_args": ["--no-eval", "--measure-warmup-steps", "2"]},
            "job": {"walltime": "00:10:00"}}
    the_plan = plan(spec, output_dir=tmp_path / "sweep")
    submit(the_plan, env=local_env(slurm_cluster.env, threads_per_rank=1))
    manifest = wait(the_plan.output_dir, timeout=900, poll_s=1, env=slurm_cluster.env)
    assert {r.state for r in manifest.points.values()} == {"complete"}, [r.reason for r in manifest.points.values()]
    before = tree_hash(the_plan.output_dir)
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "larscale", "report", str(the_plan.output_dir), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert tree_hash(the_plan.output_dir) == before
    points = pd.read_csv(out / "data" / "points.csv")
    assert sorted(points["ranks"]) == [1, 2]
    for row in points.itertuples():
        assert row.step_s == pytest.approx(slowest_rank_mean_step(the_plan.output_dir / "runs" / row.point), rel=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sweeps"][0]["scheduler"] == "slurm" and summary["machine"] == "test-slurm"
    (outside,) = [r for r in summary["calibration"]["predicted_vs_measured"] if r["role"] == "out of sample"]
    assert f"error {outside['error']:+.1%}" in proc.stdout
