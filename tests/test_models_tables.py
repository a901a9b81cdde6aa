"""The per-layer tables: published totals, packaged files = regenerated, readable without torch/tensorflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import models
from models.arch import UnknownModelError
from models.tables import csv_text, json_text, layer_table, load_table, read_csv, totals, write_tables
from tests.conftest import REPO

# Published figures: parameters and forward multiply-adds for one image, 1000 classes. Sources: torchvision's model
# documentation (ResNet-50 v1.5, VGG-16; its "GFLOPS" count multiply-adds), He et al. 2016 (arXiv:1512.03385)
# Table 1 (ResNet-50 v1), Szegedy et al. 2015 (arXiv:1409.4842) Table 1 (GoogLeNet without auxiliary heads) and
# the BVLC Caffe AlexNet model (bvlc_alexnet: grouped conv2/4/5, 227 px input).
PUBLISHED = {
    "alexnet": (60.97e6, 0.724e9),
    "alexnet_bn": (60.97e6, 0.724e9),
    "resnet50": (25.56e6, 4.09e9),
    "resnet50_v1": (25.56e6, 3.86e9),
    "googlenet": (6.9e6, 1.58e9),  # 6.8-7.0 M, checked as a range below
    "vgg16": (138.36e6, 15.47e9),
}


def test_registry_names_and_sizes() -> None:
    assert models.names() == ["alexnet", "alexnet_bn", "resnet50", "resnet50_v1", "googlenet", "vgg16"]
    assert [models.input_size(n) for n in models.names()] == [227, 227, 224, 224, 224, 224]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_totals_match_published_figures(name: str) -> None:
    params, macs = PUBLISHED[name]
    got = totals(name)
    if name == "googlenet":
        assert 6.8e6 <= got["params"] <= 7.0e6
    else:
        assert got["params"] == pytest.approx(params, rel=0.01)
    assert got["macs"] == pytest.approx(macs, rel=0.01)
    assert got["gradient_bytes"] == 4 * got["params"]


def test_alexnet_bn_differs_from_alexnet_only_in_normalisation() -> None:
    plain, bn = load_table("alexnet"), load_table("alexnet_bn")
    assert totals("alexnet")["params"] == totals("alexnet_bn")["params"]
    assert totals("alexnet")["macs"] == totals("alexnet_bn")["macs"]
    assert [r.kind for r in plain if r.kind == "lrn"] == ["lrn", "lrn"]
    assert [r.name for r in bn if r.kind == "batchnorm"] == ["norm4", "norm3", "norm2", "norm1"]
    assert all(r.params == 0 for r in bn if r.kind == "batchnorm")  # BN without scale and bias


@pytest.mark.parametrize("name", models.names())
def test_packaged_files_are_what_the_code_generates(name: str) -> None:
    package = REPO / "models" / "tables"
    assert (package / f"{name}.json").read_text() == json_text(name)
    assert (package / f"{name}.csv").read_text() == csv_text(name)
    assert load_table(name) == layer_table(name) == read_csv(name)


def test_regenerate_command_writes_and_checks(tmp_path: Path) -> None:
    assert len(write_tables(tmp_path)) == 2 * len(models.names())
    assert write_tables(tmp_path, check=True) == []
    stale = tmp_path / "vgg16.csv"
    stale.write_text(stale.read_text().replace("fc8", "fc9", 1))
    assert write_tables(tmp_path, check=True) == [stale]
    assert load_table("vgg16", tmp_path) == load_table("vgg16")
    proc = subprocess.run([sys.executable, "-m", "models.tables", "--check"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tables_load_without_torch_or_tensorflow() -> None:
    code = ("import sys, models; from models.tables import load_table, totals; "
            "[load_table(n) for n in models.names()]; totals('resnet50'); "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'tf_keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_json_document_is_self_describing() -> None:
    document = json.loads(json_text("resnet50"))
    assert document["image_size"] == 224 and document["num_classes"] == 1000
    assert document["totals"] == totals("resnet50")
    assert document["layers"][0]["name"] == "fc"  # backward order: the classifier's gradient is ready first
    assert document["layers"][-1]["name"] == "conv1"


def test_rows_follow_layer_shapes() -> None:
    rows = {r.name: r for r in load_table("alexnet")}
    # conv2: 256 outputs of 27x27 from 48 input channels per group with a 5x5 kernel.
    assert rows["conv2"].output_shape == (256, 27, 27)
    assert rows["conv2"].params == 256 * 48 * 25 + 256
    assert rows["conv2"].macs == 256 * 27 * 27 * 48 * 25
    assert rows["fc6"].params == 9216 * 4096 + 4096
    assert rows["pool5"].activation_bytes == 4 * 256 * 6 * 6


def test_layer_table_for_other_sizes_and_classes() -> None:
    native = totals("resnet50")
    small = layer_table("resnet50", 64, num_classes=10)
    assert small[0].output_shape == (10,)
    assert sum(r.params for r in small) == native["params"] - 2048 * 990 - 990
    # Convolution MACs scale with the number of output pixels: (64/224)^2 of the native count, up to the head
    # and the rounding of odd feature-map sizes.
    conv_macs = sum(r.macs for r in small if r.kind == "conv")
    assert conv_macs == pytest.approx((native["macs"] - 2048 * 1000) * (64 / 224) ** 2, rel=0.02)
    assert layer_table("googlenet", 31)[-1].output_shape == (64, 16, 16)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: load_table("resnet18"), "known models: alexnet, alexnet_bn, resnet50"),
    (lambda: totals("nope"), "unknown model 'nope'"),
    (lambda: layer_table("alexnet", 224), "alexnet has a fixed-size classifier head: image_size must be 227"),
    (lambda: layer_table("vgg16", 64), "image_size must be 224, got 64"),
    (lambda: layer_table("googlenet", 30), "image_size 30 is too small for googlenet"),
    (lambda: layer_table("resnet50", 0), "image_size must be a positive integer, got 0"),
    (lambda: layer_table("resnet50", num_classes=0), "num_classes must be a positive integer, got 0"),
    (lambda: layer_table("resnet50", num_classes=-3), "got -3"),
    (lambda: layer_table("resnet50", num_classes=2.5), "got 2.5"),
])
def test_bad_inputs_raise_clear_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_unknown_model_error_is_a_value_error() -> None:
    with pytest.raises(UnknownModelError):
        models.input_size("alexnet_v2")
