"""Compute modes (eager, compiled), gradient width as an input, and prediction intervals."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from analysis.devices import machine_for_device
from analysis.params import PerfParams
from analysis.predict import INTERVAL_Z, predict, predict_point
from larscale.machine import load_machine, parse_machine


def test_compiled_mode_matches_the_measured_h200_figure_and_eager_stays() -> None:
    # One H200, ResNet-50 224 px, batch 256, bf16, this project's model and LARS: eager 4,650, compiled 6,720.
    h200 = machine_for_device("h200", 1, 100.0, 1)
    eager = predict_point("resnet50", h200, 1, 256, 1, precision="bf16")
    compiled = predict_point("resnet50", h200, 1, 256, 1, precision="bf16", compute_mode="compiled")
    assert eager["images_per_s"] == pytest.approx(4650, rel=0.03)
    assert compiled["images_per_s"] == pytest.approx(6720, rel=0.03)
    # Compiled steps replay their launches: small batches are no longer host-bound at eager's ~20 ms floor.
    small = predict_point("resnet50", h200, 1, 32, 1, precision="bf16", compute_mode="compiled")
    assert small["compute_s"] < 0.5 * predict_point("resnet50", h200, 1, 32, 1, precision="bf16")["compute_s"]


def test_compute_mode_comes_from_the_profile_and_is_overridden_by_the_argument() -> None:
    doc = load_machine("dgx-h100").to_dict()
    doc["compute"]["mode"] = "compiled"
    compiled_profile = parse_machine(doc)
    a = predict_point("resnet50", compiled_profile, 2, 2 * 8 * 64, 1, precision="bf16")
    b = predict_point("resnet50", "dgx-h100", 2, 2 * 8 * 64, 1, precision="bf16", compute_mode="compiled")
    c = predict_point("resnet50", compiled_profile, 2, 2 * 8 * 64, 1, precision="bf16", compute_mode="eager")
    d = predict_point("resnet50", "dgx-h100", 2, 2 * 8 * 64, 1, precision="bf16")
    assert a["compute_s"] == pytest.approx(b["compute_s"]) and c["compute_s"] == pytest.approx(d["compute_s"])
    assert a["compute_s"] < c["compute_s"]
    with pytest.raises(ValueError, match="unknown compute mode 'jit'"):
        predict_point("resnet50", "dgx-h100", 1, 64, 1, compute_mode="jit")


def test_gradient_dtype_is_an_input() -> None:
    full = predict_point("vgg16", "p100-cluster", 8, 8 * 4 * 32, 1)
    half = predict_point("vgg16", "p100-cluster", 8, 8 * 4 * 32, 1, gradient_dtype="fp16")
    assert half["comm_total_s"] < 0.6 * full["comm_total_s"]
    with pytest.raises(ValueError, match="unknown gradient dtype 'int8'"):
        predict_point("vgg16", "p100-cluster", 8, 8 * 4 * 32, 1, gradient_dtype="int8")


def test_intervals_bracket_the_prediction_and_widen_with_scale() -> None:
    p = predict("resnet50", "dgx-h100", np.array([1, 16]), np.array([64, 16 * 8 * 64]), 90,
                ranks_per_node=np.array([1, 8]), precision="bf16")
    assert np.all(p.iteration_s_low < p.iteration_s) and np.all(p.iteration_s < p.iteration_s_high)
    assert np.all(p.images_per_s_low < p.images_per_s) and np.all(p.images_per_s < p.images_per_s_high)
    assert np.allclose(p.node_hours_high / p.node_hours, p.iteration_s_high / p.iteration_s)
    params = PerfParams.from_machine(load_machine("dgx-h100"), "bf16")
    one = math.log(p.iteration_s_high[0] / p.iteration_s[0]) / INTERVAL_Z
    many = math.log(p.iteration_s_high[1] / p.iteration_s[1]) / INTERVAL_Z
    assert one == pytest.approx(params.compute_sigma_roofline)
    assert many == pytest.approx(math.hypot(params.compute_sigma_roofline, params.scale_sigma))


def test_measured_compute_gets_the_measured_spread_and_zero_spread_gives_no_band() -> None:
    machine = load_machine("dgx-h100")
    params = PerfParams.from_machine(machine, "bf16").replace(measured_images_per_s={"resnet50": {64: 3000.0}})
    p = predict("resnet50", machine, 1, 64, 1, ranks_per_node=1, params=params).record(0)
    assert math.log(p["iteration_s_high"] / p["iteration_s"]) / INTERVAL_Z == pytest.approx(
        params.compute_sigma_measured)
    flat = params.replace(compute_sigma_measured=0.0, scale_sigma=0.0)
    q = predict("resnet50", machine, 4, 4 * 8 * 64, 1, params=flat).record(0)
    assert q["iteration_s_low"] == q["iteration_s"] == q["iteration_s_high"]


def test_cli_predict_prints_the_interval_and_takes_the_new_options() -> None:
    out = subprocess.run([sys.executable, "-m", "larscale", "predict", "--model", "resnet50", "--machine", "dgx-h100",
                          "--nodes", "4", "--global-batch", "2048", "--precision", "bf16", "--compute-mode",
                          "compiled", "--gradient-dtype", "bf16", "--format", "json"],
                         capture_output=True, text=True, check=True)
    (record,) = json.loads(out.stdout)
    assert record["images_per_s_low"] < record["images_per_s"] < record["images_per_s_high"]
    assert record["node_hours_low"] < record["node_hours"] < record["node_hours_high"]


def test_plan_carries_the_interval_into_node_hours() -> None:
    from analysis.plan import format_plan, plan

    result = plan("resnet50", "stampede2-knl", target_top1=74.9, budget_node_hours=2000, max_walltime="02:00:00")
    for row in result.rows:
        assert row.node_hours_low < row.node_hours < row.node_hours_high
        assert row.time_to_train_s_low < row.time_to_train_s < row.time_to_train_s_high
        assert row.wall_s_low < row.wall_s < row.wall_s_high
        # predict's own interval, not a second one: the ends are the prediction's ends plus their restart chains.
        point = predict("resnet50", "stampede2-knl", row.nodes, row.global_batch, row.epochs).record(0)
        assert (row.time_to_train_s_low, row.time_to_train_s_high) == pytest.approx(
            (point["time_to_train_s_low"], point["time_to_train_s_high"]), rel=1e-9)
        for end in ("low", "high"):
            wall = getattr(row, f"wall_s_{end}")
            chain = (wall - getattr(row, f"time_to_train_s_{end}")) / result.restart_overhead_s
            assert chain >= 1 and chain == pytest.approx(round(chain))
            assert getattr(row, f"node_hours_{end}") == pytest.approx(row.nodes * wall / 3600)
    text = format_plan(result)
    assert "90 % node-h" in text and "90 % train h" in text and "90 % wall h" in text
    first = result.rows[0]
    assert f"{first.time_to_train_s_low / 3600:.2f}-{first.time_to_train_s_high / 3600:.2f}" in text
    assert all("time_to_train_s_low" in r and "wall_s_high" in r for r in result.to_dict()["rows"])
