"""`larscale report` on real sweeps: a weak and a strong sweep of 1 and 2 ranks run through the local scheduler,
a sweep with a failed and a never-submitted point, and bad inputs that must each give one line and touch nothing."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO

pytestmark = pytest.mark.slow

TRAINING = {"steps": 8, "optimizer": "lars", "lr": 0.1, "image_size": 32, "num_classes": 10,
            "extra_args": ["--no-eval", "--measure-warmup-steps", "2"]}


def spec(name: str, sweep: dict, model: str = "resnet50", **training) -> dict:
    return {"name": name, "model": model, "framework": "torch", "dataset": "synthetic", "machine": "local",
            "sweep": {"nodes": [1], "ranks_per_node": [1, 2], "threads_per_rank": 1, **sweep},
            "training": {**TRAINING, **training}, "job": {"walltime": "00:10:00"}}


def larscale(*argv: str, module: str = "larscale") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=900)


def submit(root: Path, the_spec: dict, *extra: str) -> Path:
    path = root / f"{the_spec['name']}.yaml"
    path.write_text(yaml.safe_dump(the_spec))
    out = root / the_spec["name"]
    proc = larscale("sweep", "submit", str(path), "--output", str(out), "--scheduler", "local", *extra)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr        # 1: a point failed (the broken sweep)
    return out


def tree_hash(*roots: Path) -> str:
    """Names, contents and modification times of every file under the roots."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                digest.update(f"{path}:{path.stat().st_mtime_ns}:".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweeps")
    weak = submit(root, spec("r50-weak", {"kind": "weak", "batch_per_rank": 2}))
    strong = submit(root, spec("r50-strong", {"kind": "strong", "global_batch": 4}))
    # One point fails (a flag the trainer refuses: exit 2, not retried), the other is never submitted.
    broken = submit(root, spec("r50-broken", {"kind": "weak", "batch_per_rank": 2},
                               extra_args=["--no-eval", "--no-such-flag"]), "--points", "n1-p1-b2")
    other_model = submit(root, spec("alexnet-weak", {"kind": "weak", "batch_per_rank": 2}, model="alexnet",
                                    image_size=227), "--dry-run")
    # The bundled local profile with room to project to and a charge factor (same machine name: it matches).
    profile = yaml.safe_load((REPO / "larscale" / "machines" / "local.yaml").read_text())
    profile["limits"] = {"max_nodes": 64, "max_walltime": "02:00:00"}
    profile["node"]["memory_gb"] = 512
    profile["charge"] = {"factor": 2.5, "unit": "units"}
    (root / "local-64.yaml").write_text(yaml.safe_dump(profile))
    return {"root": root, "weak": weak, "strong": strong, "broken": broken, "other_model": other_model,
            "profile": root / "local-64.yaml"}


@pytest.fixture(scope="module")
def report(sweeps, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, str, str]:
    before = tree_hash(sweeps["weak"], sweeps["strong"], sweeps["broken"])
    out = tmp_path_factory.mktemp("report") / "study"
    proc = larscale("report", str(sweeps["weak"]), str(sweeps["strong"]), str(sweeps["broken"]), "--out", str(out),
                    "--machine", str(sweeps["profile"]), "--epochs", "2", "--to-nodes", "16")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc, before, tree_hash(sweeps["weak"], sweeps["strong"], sweeps["broken"])


def slowest_rank_mean_step(run_dir: Path) -> float:
    """The mean over measured steps of the slowest rank's step_s, from the step logs themselves."""
    summary = json.loads((run_dir / "summary.json").read_text())
    by_step: dict[int, float] = {}
    for path in (run_dir / "steps").glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_step[record["step"]] = max(by_step.get(record["step"], 0.0), record["step_s"])
    first = min(by_step)
    return statistics.fmean(t for s, t in by_step.items() if s >= first + summary["warmup_steps_excluded"])


def test_point_table_matches_the_runs_step_logs(report, sweeps) -> None:
    out, _, _, _ = report
    points = pd.read_csv(out / "data" / "points.csv")
    assert sorted(points["sweep"].unique()) == ["r50-strong", "r50-weak"] and len(points) == 4
    for row in points.itertuples():
        run_dir = sweeps["weak" if row.sweep == "r50-weak" else "strong"] / "runs" / row.point
        assert row.step_s == pytest.approx(slowest_rank_mean_step(run_dir), rel=1e-9)
        assert row.images_per_s == pytest.approx(row.global_batch / row.step_s)
        assert row.ranks == row.nodes * row.ranks_per_node and row.global_batch == row.ranks * row.batch_per_rank
        assert row.compute_s > 0 and row.exposed_comm_s >= 0 and row.data_s >= 0
    for _, rows in points.groupby("sweep"):
        smallest = rows[rows["ranks"] == rows["ranks"].min()]
        assert (smallest["speedup"] == 1).all()
        base = smallest["images_per_s"].mean()
        assert rows["speedup"].tolist() == pytest.approx((rows["images_per_s"] / base).tolist())
        ideal = rows["ranks"] / rows["ranks"].min()
        assert rows["efficiency"].tolist() == pytest.approx((rows["speedup"] / ideal).tolist())
    assert pd.read_parquet(out / "data" / "points.parquet").equals(points)


def test_failed_and_never_submitted_points_are_listed_with_reasons(report) -> None:
    out, proc, _, _ = report
    problems = pd.read_csv(out / "data" / "problems.csv").set_index("point")
    assert set(problems.index) == {"n1-p1-b2", "n1-p2-b4"} and set(problems["sweep"]) == {"r50-broken"}
    assert problems.loc["n1-p1-b2", "state"] == "failed" and "exit 2" in problems.loc["n1-p1-b2", "reason"]
    assert problems.loc["n1-p2-b4", "state"] == "planned" and problems.loc["n1-p2-b4", "reason"] == "never submitted"
    assert "r50-broken/n1-p1-b2: failed" in proc.stdout
    assert "r50-broken/n1-p2-b4: planned: never submitted" in proc.stdout
    page = (out / "index.md").read_text()
    assert "never submitted" in page and "exit 2" in page


def test_out_of_sample_errors_are_printed_and_the_projection_carries_an_interval(report) -> None:
    out, proc, _, _ = report
    comparison = pd.read_csv(out / "data" / "predicted_vs_measured.csv")
    assert set(comparison[comparison["ranks"] == 1]["role"]) == {"fitted"}
    outside = comparison[comparison["role"] == "out of sample"]
    assert len(outside) == 2 and (outside["ranks"] == 2).all()
    for row in outside.itertuples():
        assert row.error == pytest.approx(row.predicted_s / row.measured_s - 1)
        assert f"out of sample {row.sweep}/{row.point}" in proc.stdout
        assert f"error {row.error:+.1%}" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    low, high = summary["projection"]["band"]
    assert low <= min(comparison["error"].min(), 0) + 1e-12 and high >= max(comparison["error"].max(), 0) - 1e-12
    for row in summary["projection"]["rows"]:
        assert row["nodes"] == 16 and row["iteration_s_low"] <= row["iteration_s"] <= row["iteration_s_high"]
    assert any("inter_node" in u for u in summary["calibration"]["unidentified"])
    allocation = pd.read_csv(out / "data" / "allocation.csv")
    assert not allocation.empty and (allocation["nodes"] <= 16).all()
    for figure in ("node_hours", "time_to_train_h", "device_hours", "charge_units"):   # predict's interval
        assert (allocation[f"{figure}_low"] < allocation[figure]).all(), figure
        assert (allocation[figure] < allocation[f"{figure}_high"]).all(), figure
    page = (out / "index.md").read_text()
    assert "node_hours_low" in page and "time_to_train_h_high" in page and "predict's 90 % interval" in page
    assert allocation["charge_units"].tolist() == pytest.approx((2.5 * allocation["node_hours"]).tolist())
    assert allocation["device_hours"].tolist() == pytest.approx((2 * allocation["node_hours"]).tolist())
    for row in allocation.itertuples():                   # the walltime chain under the 2 h queue limit
        assert row.jobs == max(math.ceil(row.time_to_train_h * 3600 / (7200 - 120)), 1)
    calibrated = yaml.safe_load((out / "profile.yaml").read_text())
    assert calibrated["calibration"]["base_profile"] == "local"


def test_every_figure_is_a_valid_png_or_svg_and_the_html_is_self_contained(report) -> None:
    out, _, _, _ = report
    summary = json.loads((out / "summary.json").read_text())
    figures = [out / f for f in summary["files"]["figures"]]
    stems = {f.stem for f in figures}
    assert {"strong_scaling", "speedup", "weak_scaling", "breakdown", "predicted_vs_measured"} <= stems
    for path in figures:
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                assert image.format == "PNG" and min(image.size) >= 200
        else:
            assert path.suffix == ".svg" and ElementTree.parse(path).getroot().tag.endswith("svg")
    page = (out / "index.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == len([f for f in figures if f.suffix == ".png"])
    assert 'src="plots/' not in page and "<table>" in page
    for name in ("points", "problems", "predicted_vs_measured", "projection", "allocation"):
        assert (out / "data" / f"{name}.csv").exists() and (out / "data" / f"{name}.parquet").exists()


def test_the_sweep_directories_are_not_modified(report) -> None:
    _, _, before, after = report
    assert before == after


def test_a_copied_sweep_with_a_damaged_run_lists_it_as_malformed(sweeps, tmp_path: Path) -> None:
    copy = tmp_path / "copied"
    shutil.copytree(sweeps["weak"], copy)             # run_dir in the manifest still names the original place
    (copy / "runs" / "n1-p2-b4" / "summary.json").write_text('{"status": "complete", ')
    proc = larscale("report", str(copy), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    problems = pd.read_csv(tmp_path / "out" / "data" / "problems.csv")
    assert problems["point"].tolist() == ["n1-p2-b4"] and problems["state"].tolist() == ["malformed"]
    assert "n1-p2-b4/summary.json:1: not JSON" in problems["reason"].iloc[0]
    points = pd.read_csv(tmp_path / "out" / "data" / "points.csv")
    assert points["point"].tolist() == ["n1-p1-b2"] and str(copy) in json.loads(
        (tmp_path / "out" / "summary.json").read_text())["sweeps"][0]["path"]


@pytest.mark.parametrize("case", ["not a sweep", "all failed", "mixed models", "other machine", "out inside"])
def test_bad_input_is_one_line_naming_the_culprit(case: str, sweeps, tmp_path: Path) -> None:
    not_a_sweep = tmp_path / "results"
    not_a_sweep.mkdir()
    (not_a_sweep / "results.csv").write_text("a,b\n1,2\n")
    argv, words = {
        "not a sweep": ([str(not_a_sweep)], f"{not_a_sweep}: not a sweep directory (no manifest.json"),
        "all failed": ([str(sweeps["broken"])], "has a complete run"),
        "mixed models": ([str(sweeps["weak"]), str(sweeps["other_model"])], "the sweeps mix models"),
        "other machine": ([str(sweeps["weak"]), "--machine", "stampede2-knl"],
                          "--machine stampede2-knl: the sweeps ran on machine 'local'"),
        "out inside": ([str(sweeps["weak"]), "--out", str(sweeps["weak"] / "report")], "is inside sweep directory"),
    }[case]
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    before = tree_hash(sweeps["weak"], sweeps["broken"], sweeps["other_model"])
    proc = larscale("report", *argv, module="analysis")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert tree_hash(sweeps["weak"], sweeps["broken"], sweeps["other_model"]) == before
    assert not (tmp_path / "out").exists() and not (sweeps["weak"] / "report").exists()
