"""From plan to jobs: `larscale plan --emit-sweep` writes a sweep spec that `larscale sweep` accepts and that checks
the plan's choice at small scale; `predict --format json` is a list whatever the number of configurations; the
report's projection and allocation carry predict's interval."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_emit_sweep_checks_the_precision_and_compute_mode_the_plan_priced(tmp_path: Path) -> None:
    # A plan priced bf16 compiled steps: the check must train those, not the trainer's defaults (eager, and on a
    # GPU bf16 whatever the plan assumed); an fp32 plan on the same GPU profile must say fp32.
    for precision, mode in (("bf16", "compiled"), ("fp32", "eager")):
        spec_path = tmp_path / f"check-{precision}.yaml"
        proc = larscale("plan", "--model", "resnet50", "--machine", "dgx-h100", "--epochs", "90",
                        "--budget-node-hours", "5000", "--precision", precision, "--compute-mode", mode,
                        "--emit-sweep", str(spec_path), "--emit-max-nodes", "2", "--emit-steps", "20")
        assert proc.returncode == 0, proc.stderr
        training = yaml.safe_load(spec_path.read_text())["training"]
        assert training["precision"] == precision
        assert ("--compile" in training["extra_args"]) == (mode == "compiled")
        out = tmp_path / f"sweep-{precision}"
        submitted = larscale("sweep", "submit", str(spec_path), "--output", str(out), "--dry-run")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        scripts = sorted((out / "scripts").glob("*.sh"))
        assert len(scripts) == 2
        for script in scripts:
            argv = next(line for line in script.read_text().splitlines() if "scaling.train" in line)
            assert f"--precision {precision} " in argv and ("--compile" in argv) == (mode == "compiled"), argv


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


def study_inputs(errors: dict[int, float]):
    """A calibration of stampede2-knl whose points (ranks -> predicted / measured − 1) have the given errors, every
    link identified, and a weak sweep of 16 ResNet-50 images per rank: what `larscale report` projects from."""
    import pandas as pd

    from analysis.runs import RunMeasurement
    from analysis.scaling_study import Calibration
    from analysis.sweepdirs import Sweep, SweepPoint
    from larscale.machine import parse_machine

    data = yaml.safe_load((REPO / "larscale" / "machines" / "stampede2-knl.yaml").read_text())
    profile = parse_machine(data, source=data["name"])
    comparison = pd.DataFrame([{"sweep": "weak", "point": f"p{ranks}", "role": "fitted" if ranks == 1 else
                                "out of sample", "nodes": ranks, "ranks": ranks, "global_batch": 16 * ranks,
                                "predicted_s": 1 + error, "measured_s": 1.0, "error": error}
                               for ranks, error in errors.items()])
    calibration = Calibration(profile=profile, data=data, fit_max_ranks=1, comparison=comparison, report="")
    points = [SweepPoint(sweep="weak", kind="weak", point_id=f"p{ranks}", model="resnet50", nodes=ranks,
                         ranks_per_node=1, global_batch=16 * ranks, batch_per_rank=16, run_dir="", state="complete",
                         reason="", run=RunMeasurement(path="", model="resnet50", image_size=None, ranks=ranks,
                                                       batch_per_rank=16, threads_per_rank=None, steps_measured=1,
                                                       step_s=1.0, step_s_mean=1.0, busy_s=1.0, allreduce_s=0.0,
                                                       compute_s=1.0, optimizer_s=0.0, data_s=0.0))
              for ranks in errors]
    sweep = Sweep(name="weak", path=Path("weak"), kind="weak", model="resnet50", machine=data, scheduler="slurm",
                  points=points)
    return calibration, [sweep]


def test_report_projection_and_allocation_carry_predicts_interval() -> None:
    """The projection's and the allocation's ends are predict's and plan's own 90 % interval (no second
    uncertainty model); a sweep whose multi-rank points miss by more than the kind's spread widens it."""
    from analysis.params import PerfParams
    from analysis.plan import plan
    from analysis.predict import INTERVAL_Z, predict
    from analysis.scaling_study import StudyOptions, allocation, project

    options = StudyOptions(to_nodes=512, epochs=64, configurations=3)
    calibration, sweeps = study_inputs({1: 0.0, 2: 0.01, 4: -0.01})
    projection = project(calibration, sweeps, options)
    (row,) = projection.table.to_dict("records")
    own = predict("resnet50", calibration.profile, 512, 16 * 512, 1, ranks_per_node=1).record(0)
    assert (row["iteration_s_low"], row["iteration_s"], row["iteration_s_high"]) == pytest.approx(
        (own["iteration_s_low"], own["iteration_s"], own["iteration_s_high"]), rel=1e-12)
    table, notes = allocation(calibration, projection, "resnet50", options)
    planned = {(r.nodes, r.global_batch): r for r in plan("resnet50", calibration.profile, epochs=64, max_nodes=512,
                                                            ranks_per_node=1).rows}
    assert not table.empty and any("90 % interval" in n for n in notes)
    for record in table.to_dict("records"):
        same = planned[(record["nodes"], record["global_batch"])]
        assert (record["time_to_train_h_low"] * 3600, record["time_to_train_h_high"] * 3600) == pytest.approx(
            (same.time_to_train_s_low, same.time_to_train_s_high), rel=1e-12)
        assert (record["node_hours_low"], record["node_hours"], record["node_hours_high"]) == pytest.approx(
            (same.node_hours_low, same.node_hours, same.node_hours_high), rel=1e-12)
        assert record["device_hours_low"] < record["device_hours"] < record["device_hours_high"]
        assert record["jobs_low"] <= record["jobs"] <= record["jobs_high"]

    # Points 30 % off at 2 and 4 ranks: the scale spread becomes their RMS log error.
    wide_calibration, sweeps = study_inputs({1: 0.0, 2: 0.3, 4: -0.3})
    wide = project(wide_calibration, sweeps, options)
    residual = math.sqrt((math.log1p(0.3) ** 2 + math.log1p(-0.3) ** 2) / 2)
    assert wide.scale_sigma == pytest.approx(residual)
    (row,) = wide.table.to_dict("records")
    kind = PerfParams.from_machine(calibration.profile)
    assert residual > kind.scale_sigma
    expected = math.exp(INTERVAL_Z * math.hypot(kind.compute_sigma_roofline, residual))
    assert row["iteration_s_high"] / row["iteration_s"] == pytest.approx(expected, rel=1e-9)
