"""`larscale models`: listing, per-layer tables in three formats, regeneration check, clear usage errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

import larscale
import models
from models.tables import DATA_DIR, layer_table, sum_rows, totals
from tests.conftest import REPO


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    status = larscale.main(["models", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_listing_shows_every_model_with_totals(capsys) -> None:
    status, out, _ = run(capsys)
    assert status == 0
    for name in models.names():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert f"{totals(name)['params']:,}" in line and str(models.input_size(name)) in line


def test_text_table_lists_layers_last_first_and_totals(capsys) -> None:
    status, out, _ = run(capsys, "alexnet")
    assert status == 0
    lines = out.splitlines()
    assert lines[2].split()[:3] == ["fc8", "linear", "1000"]
    assert lines[-4].split()[:3] == ["conv1", "conv", "96x55x55"]
    total = lines[-2].split()
    assert total[0] == "total" and total[1:] == [f"{v:,}" for v in totals("alexnet").values()]
    assert "60.97 M parameters, 0.724 GMAC" in lines[-1]


def test_csv_output_is_the_packaged_table(capsys) -> None:
    status, out, _ = run(capsys, "googlenet", "--format", "csv")
    assert status == 0
    assert out == (DATA_DIR / "googlenet.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(out)))
    assert sum(int(r["macs"]) for r in rows) == totals("googlenet")["macs"]


def test_json_output_for_another_size_and_class_count(capsys) -> None:
    status, out, _ = run(capsys, "resnet50", "--format", "json", "--image-size", "64", "--num-classes", "10")
    assert status == 0
    document = json.loads(out)
    assert (document["image_size"], document["num_classes"]) == (64, 10)
    assert document["totals"] == sum_rows(layer_table("resnet50", 64, 10))
    assert document["layers"][0]["output_shape"] == [10]


def test_check_reports_packaged_tables_up_to_date(capsys) -> None:
    status, out, _ = run(capsys, "--check")
    assert status == 0 and "up to date" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["resnet18"], "unknown model 'resnet18'; known models: alexnet, alexnet_bn, resnet50, resnet50_v1, googlenet"),
    (["vgg16", "--image-size", "64"], "vgg16 has a fixed-size classifier head: image_size must be 224, got 64"),
    (["alexnet", "--num-classes", "0"], "num_classes must be a positive integer, got 0"),
    (["googlenet", "--image-size", "20"], "image_size 20 is too small for googlenet"),
    (["alexnet", "--regenerate"], "--regenerate/--check act on every table: give no NAME"),
])
def test_usage_errors_are_one_line_with_exit_2(capsys, argv: list[str], message: str) -> None:
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert err.startswith(f"larscale models: error: {message}")
    assert len(err.strip().splitlines()) == 1


def test_error_from_the_command_line_has_no_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "larscale", "models", "lenet"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown model 'lenet'" in proc.stderr
