"""From plan to jobs: `larscale plan --emit-sweep` writes a sweep spec that `larscale sweep` accepts and that checks
the plan's choice at small scale; `predict --format json` is a list whatever the number of configurations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO


def larscale(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "larscale", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_emit_sweep_writes_a_spec_that_dry_runs_at_the_chosen_batch(tmp_path: Path) -> None:
    spec_path = tmp_path / "check.yaml"
    proc = larscale("plan", "--model", "resnet50", "--machine", "stampede2-knl", "--target-top1", "74.9",
                    "--budget-node-hours", "5000", "--format", "json", "--emit-sweep", str(spec_path),
                    "--emit-max-nodes", "2", "--emit-steps", "20")
    assert proc.returncode == 0, proc.stderr
    fastest = json.loads(proc.stdout)["pareto_front"]
    fastest = min(fastest, key=lambda r: r["wall_s"])
    spec = yaml.safe_load(spec_path.read_text())
    assert spec["machine"] == "stampede2-knl" and spec["model"] == "resnet50"
    assert spec["sweep"] == {"kind": "weak", "nodes": [1, 2], "ranks_per_node": fastest["ranks_per_node"],
                             "batch_per_rank": fastest["batch_per_rank"], "threads_per_rank": 68}
    assert spec["training"]["steps"] == 20
    out = tmp_path / "sweep"
    submitted = larscale("sweep", "submit", str(spec_path), "--output", str(out), "--dry-run")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    params = [p["params"] for p in manifest["points"].values()]
    assert sorted(p["nodes"] for p in params) == [1, 2]
    assert {p["batch_per_rank"] for p in params} == {fastest["batch_per_rank"]}
    scripts = {Path(p["script"]) for p in manifest["points"].values()}
    assert scripts and all(s.exists() and "#SBATCH" in s.read_text() for s in scripts)
    for script in scripts:  # what the golden tests ask of every script: valid bash
        syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert syntax.returncode == 0, (script, syntax.stderr)


def test_emit_sweep_refuses_a_directory(tmp_path: Path) -> None:
    proc = larscale("plan", "--model", "resnet50", "--machine", "stampede2-knl", "--epochs", "90",
                    "--emit-sweep", str(tmp_path))
    assert proc.returncode == 2 and f"--emit-sweep {tmp_path}: is a directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_predict_json_is_always_a_list() -> None:
    one = larscale("predict", "--model", "alexnet", "--machine", "stampede2-skx", "--nodes", "16",
                   "--global-batch", "4096", "--format", "json")
    two = larscale("predict", "--model", "alexnet", "--machine", "stampede2-skx", "--nodes", "16", "32",
                   "--global-batch", "4096", "--format", "json")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    single, pair = json.loads(one.stdout), json.loads(two.stdout)
    assert isinstance(single, list) and len(single) == 1 and len(pair) == 2
    assert single[0] == pair[0]
