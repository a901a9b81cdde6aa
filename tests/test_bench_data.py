"""The benchmarks that measure without a target on this machine, run for real with tiny settings: bench_data (the
JPEG tree it writes, the loader rates and the cores-per-GPU arithmetic) and bench_gpu's CPU smoke mode (the rows,
the interleaving, the ratios, a failing row reported while the run goes on). Speeds are never asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scaling import data
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_data  # noqa: E402


def result_of(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT {")]
    assert len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[0][len("RESULT "):])


def test_jpeg_tree_is_an_imagenet_folder_the_loader_reads(tmp_path):
    from PIL import Image

    tree = bench_data.write_jpeg_tree(tmp_path, bench_data.TreeSpec(train_images=24, val_images=8, classes=4))
    assert tree["files"] == 32 and 60 < tree["mean_kb"] < 200          # ImageNet-like sizes on disk
    spec = data.parse_dataset(f"imagenet:{tmp_path}")
    train, val = data.imagenet_datasets(spec, 224, "extended", seed=0)
    assert len(train) == 24 and len(val) == 8 and len(train.classes) == 4
    with Image.open(train.samples[0][0]) as image:
        assert image.format == "JPEG" and image.size in bench_data.IMAGENET_LIKE_SIZES
    x, label = train[(3, 1)]
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and 0 <= label < 4


def test_bench_data_reports_rates_per_process_and_cores_per_gpu(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench_data.py", "--train-images", "96", "--batch", "16",
                           "--workers", "0", "1", "--rounds", "1", "--augmentation", "minimal",
                           "--stage-samples", "4", "--json", str(tmp_path / "r.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = result_of(proc)
    assert result == json.loads((tmp_path / "r.json").read_text())
    rates = {r["workers"]: r for r in result["rates"]}
    assert set(rates) == {0, 1} and all(r["images_per_s"] > 0 for r in rates.values())
    assert rates[1]["per_process"] == rates[1]["images_per_s"]
    assert all(r["per_cpu_second"] > 0 for r in rates.values())
    per_core = result["images_per_s_per_core"]["minimal"]
    assert per_core == rates[1]["per_cpu_second"]          # one worker's images per CPU-second
    for gpu, rate in bench_data.GPU_RATES.items():
        assert result["cores_per_gpu"]["minimal"][gpu] == math.ceil(rate / per_core)
    assert set(result["stage_ms"]["minimal"]) == {"decode", "crop_resize", "flip", "colour_jitter", "normalise"}


def test_bench_data_refuses_bad_input_in_one_line():
    proc = subprocess.run([sys.executable, "benchmarks/bench_data.py", "--workers", "-1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--workers must be >= 0, got -1" in proc.stderr.strip().splitlines()[-1]


def bench_gpu_smoke(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--device", "cpu", "--image-size", "32",
                           "--batch", "2", "--steps", "2", "--warmup", "1", "--rounds", "2",
                           "--out", str(tmp_path / "out"), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bench_gpu_smoke_mode_runs_the_rows_side_by_side_on_cpu(tmp_path):
    proc = bench_gpu_smoke(tmp_path, "--rows", "bare_eager_lars", "larscale_eager", "lars_step")
    result = result_of(proc)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = result["rows"]
    assert len(rows["bare_eager_lars"]["images_per_s"]) == 2 and len(rows["larscale_eager"]["images_per_s"]) == 2
    assert all(row["error"] is None for row in rows.values())
    ratio = result["ratios"]["larscale_eager_over_bare_eager"]
    assert ratio["value"] == pytest.approx(rows["larscale_eager"]["median"] / rows["bare_eager_lars"]["median"])
    assert ratio["met"] is None and result["targets_checked"] is False          # no targets off a GPU
    assert {"lars", "sgd_foreach"} <= set(rows["lars_step"]["detail"]["median_s"])
    # the larscale runs left their run directories (and logs) under --out
    for round_index in (0, 1):
        assert (tmp_path / "out" / f"larscale_eager-{round_index}" / "run" / "summary.json").is_file()


def test_bench_gpu_reports_a_failed_row_and_goes_on(tmp_path):
    proc = bench_gpu_smoke(tmp_path, "--rows", "bare_eager_sgd", "larscale_eager", "--launcher", "false")
    result = result_of(proc)
    assert proc.returncode == 1
    assert result["rows"]["larscale_eager"]["error"].startswith("RuntimeError: exit 1")
    assert len(result["rows"]["bare_eager_sgd"]["images_per_s"]) == 2          # the other row ran both rounds
    assert result["ratios"]["larscale_eager_over_bare_eager"]["value"] is None
    assert "larscale_eager_over_bare_eager" in proc.stdout and "unmeasured" in proc.stdout
