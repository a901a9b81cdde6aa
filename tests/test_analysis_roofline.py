"""The layer-by-layer compute model (analysis/roofline.py), NCCL's collective, overlap modes, profile defaults."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import yaml

from analysis import comm
from analysis.calibrate import calibrated_profile, overlap_mode
from analysis.devices import machine_for_device
from analysis.fit_compute import ComputeFit, RooflinePoint, fit_compute
from analysis.params import PerfParams, profile_notes
from analysis.predict import predict, predict_from, predict_point
from analysis.reproduce import device_comparison
from analysis.roofline import (
    DeviceRates,
    PiecewiseLinear,
    memory_rate,
    roofline_curves,
    step_seconds_plain,
    traced_layers,
)
from analysis.runs import RunMeasurement
from analysis.workload import load_workload
from larscale.machine import load_machine, parse_machine
from tests.conftest import REPO

MODELS = ("resnet50", "resnet50_v1", "alexnet", "alexnet_bn", "vgg16", "googlenet")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("device", "precision"), [("h200", "bf16"), ("v100", "fp32"), ("xeon-phi-7250", "fp32")])
def test_vectorised_curves_equal_the_plain_layer_sum(model: str, device: str, precision: str) -> None:
    params = PerfParams.from_machine(machine_for_device(device, 1, 100, 1), precision)
    layers = load_workload(model).layers
    curves = roofline_curves(layers, params.rates)
    rng = np.random.default_rng(7)
    batches = np.concatenate([rng.uniform(0.01, 4096, 60), [1, 2, 16, 64, 255.5, 256, 1024]])
    forward, backward = curves.forward(batches), curves.backward(batches)
    for x, f, b in zip(batches, forward, backward, strict=True):
        plain = step_seconds_plain(layers, params.rates, x)
        assert f == pytest.approx(plain.forward_s, rel=1e-12)
        assert b == pytest.approx(plain.backward_s, rel=1e-12)
        assert curves.fixed_s == pytest.approx(plain.fixed_s, rel=1e-12)


def test_piecewise_linear_by_hand() -> None:
    # max(2x, 0.5x + 3): knot at x = 2; max(x, 2x) (memory always wins): 2x.
    curve = PiecewiseLinear.from_pieces([(2.0, 0.5, 3.0), (1.0, 2.0, 0.0)])
    for x, expected in [(0.5, 0.25 + 3 + 1), (2.0, 4 + 4), (3.0, 6 + 6), (10.0, 20 + 20)]:
        assert float(curve(x)) == pytest.approx(expected)


def test_traced_layers_carry_inputs_and_groups() -> None:
    alexnet = {layer.name: layer for layer in traced_layers("alexnet_bn")}
    assert alexnet["conv1"].channels == 3 and alexnet["conv1"].backward_flops == alexnet["conv1"].forward_flops
    assert alexnet["conv2"].grouped and alexnet["conv2"].channels == 48          # 96 in, 256 out, 2 groups
    assert not alexnet["conv3"].grouped and alexnet["conv3"].channels == 256
    assert alexnet["conv3"].backward_flops == 2 * alexnet["conv3"].forward_flops
    resnet = {layer.name: layer for layer in traced_layers("resnet50")}
    # The shortcut reads the block's input (256 channels at 56x56), not the previous row (bn3).
    shortcut = resnet["layer2.0.shortcut.conv"]
    assert shortcut.channels == 256 and shortcut.forward_elements == 256 * 56 * 56 + 512 * 28 * 28
    # An addition reads both inputs and writes one output.
    assert resnet["layer1.0.add"].forward_elements == 3 * 256 * 56 * 56
    assert sum(layer.params for layer in resnet.values()) == load_workload("resnet50").params


def test_memory_rate_is_bandwidth_or_bytes_in_flight_whichever_binds() -> None:
    # Few units: bound by the bytes in flight (units × bytes / latency); many: by the bandwidth.
    assert memory_rate(1e12, 1.0, 1, 1e4, 1e-6) == pytest.approx(1 / (1e-12 + 1e-10))
    assert memory_rate(1e12, 0.5, 1e6, 1e4, 1e-6) == pytest.approx(0.5e12, rel=1e-3)
    # A faster memory behind the same SMs reaches a smaller share of its bandwidth.
    v100, h200 = (PerfParams.from_machine(machine_for_device(d, 1, 100, 1), "bf16" if d == "h200" else "fp16")
                  for d in ("v100", "h200"))
    assert v100.rates.memory_bytes_per_s / 900e9 > h200.rates.memory_bytes_per_s / 4800e9


def test_every_public_single_device_figure_within_its_tolerance() -> None:
    comparison = device_comparison()
    assert comparison.tolerance <= 0.20
    assert len(comparison.rows) >= 15 and {r.device for r in comparison.rows} >= {"v100", "a100-80gb", "h200"}
    bad = [f"{r.device} {r.precision} {r.model} b={r.batch}: {r.error:+.1%}" for r in comparison.rows
           if abs(r.error) > comparison.tolerance]
    assert not bad, bad


def test_small_gpu_batches_cost_the_hosts_launch_time() -> None:
    h200 = machine_for_device("h200", 1, 100, 1)
    steps = {b: predict_point("resnet50", h200, 1, b, 1, precision="bf16")["iteration_s"] for b in (8, 16, 32, 256)}
    assert steps[8] == pytest.approx(steps[16]) == pytest.approx(steps[32])      # the launch floor
    assert 0.015 < steps[16] < 0.025                                              # device_throughput.yaml: 17-22 ms
    assert steps[256] > 2 * steps[16]
    compiled = parse_machine({**h200.to_dict(), "compute": {"host_us_per_op": 2.0}})
    assert predict_point("resnet50", compiled, 1, 16, 1, precision="bf16")["iteration_s"] < 0.6 * steps[16]


def test_issue_h100_prediction_is_no_longer_far_too_slow() -> None:
    per_gpu = predict_point("resnet50", "dgx-h100", 1, 2048, 1, precision="bf16")["images_per_s"] / 8
    # H200 measured 4,650 img/s at 256 (bandwidth 4.8 TB/s); H100 has 3.35 TB/s and the same tensor peak.
    assert 3000 < per_gpu < 4650


def test_missing_memory_bandwidth_is_one_line_naming_the_field_and_default(tmp_path) -> None:
    doc = load_machine("dgx-h100").to_dict()
    del doc["node"]["devices"]["memory_bandwidth_gbytes_per_s"]
    notes = profile_notes(parse_machine(doc), "bf16")
    assert len(notes) == 1 and "node.devices.memory_bandwidth_gbytes_per_s" in notes[0]
    assert f"{67 * 1000 / 15:.4g} GB/s" in notes[0]
    path = tmp_path / "nobw.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "larscale", "predict", "--model", "resnet50", "--machine", str(path),
                           "--nodes", "1", "--global-batch", "256", "--precision", "bf16", "--format", "json"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line] == [f"larscale: note: {notes[0]}"]
    assert profile_notes(load_machine("dgx-h100"), "bf16") == ()


def test_nccl_allreduce_cost_by_hand() -> None:
    link = comm.LinkCost(alpha_intra_s=2e-6, beta_intra_s_per_byte=1e-11, alpha_inter_s=5e-6,
                         beta_inter_s_per_byte=4e-11, gamma_s_per_byte=1e-12)
    n, m, q = 1e8, 16, 8
    p = m * q
    # Across nodes the rings pass through every node's NICs (2(p-1)/p of n), paced by them, not by NVLink.
    # NCCL reduces inside its pipelined copy kernels: no γ term.
    expected = 2 * (q - 1) * 2e-6 + 2 * math.ceil(math.log2(m)) * 5e-6 + 2 * (p - 1) / p * n * 4e-11
    assert float(comm.allreduce_time("nccl", n, m, q, link)) == pytest.approx(expected)
    one_node = 2 * (q - 1) * 2e-6 + 2 * (q - 1) / q * n * 1e-11
    assert float(comm.allreduce_time("nccl", n, 1, q, link)) == pytest.approx(one_node)
    # Latency grows with log2 of the nodes, and NCCL moves fewer bytes inside a node than a leader's tree.
    a1024, _ = comm.allreduce_affine("nccl", 1024, 8, link)
    a16, _ = comm.allreduce_affine("nccl", 16, 8, link)
    assert float(a1024 - a16) == pytest.approx(2 * 6 * 5e-6)
    hierarchical = comm.allreduce_terms("hierarchical", n, 1, q)
    nccl = comm.allreduce_terms("nccl", n, 1, q)
    assert float(nccl.beta_intra) < float(hierarchical.beta_intra)


def test_small_per_gpu_batches_at_scale_are_latency_and_launch_bound() -> None:
    # 128 DGX H200 nodes (1024 GPUs): at 16 images per GPU the step is the host's launch floor plus the
    # exposed communication; from 16 to 64 images per GPU the step barely grows while the work quadruples.
    r = {b: predict_point("resnet50", "dgx-h200", 128, 1024 * b, 1, precision="bf16") for b in (16, 64, 256)}
    assert r[64]["iteration_s"] < 1.3 * r[16]["iteration_s"]
    assert r[16]["images_per_s"] < r[64]["images_per_s"] < r[256]["images_per_s"]
    assert r[16]["scaling_efficiency"] < r[256]["scaling_efficiency"]


def test_no_overlap_puts_the_allreduces_after_the_backward_pass() -> None:
    machine = load_machine("dgx-h100")
    layerwise = predict_point("resnet50", machine, 16, 16 * 8 * 64, 1, precision="bf16")
    none = predict_point("resnet50", machine, 16, 16 * 8 * 64, 1, precision="bf16", overlap="none")
    assert none["compute_s"] == layerwise["compute_s"]
    assert none["comm_exposed_s"] > layerwise["comm_exposed_s"]
    assert none["comm_exposed_s"] >= none["comm_total_s"] - 1e-12       # nothing hides
    assert none["iteration_s"] >= none["compute_s"] + none["comm_total_s"] - 1e-12
    # The profile field does the same as the option.
    profile = parse_machine({**machine.to_dict(), "network": {**machine.to_dict()["network"], "overlap": "none"}})
    assert predict_point("resnet50", profile, 16, 16 * 8 * 64, 1, precision="bf16") == none


def _run(overlap: str | None) -> RunMeasurement:
    return RunMeasurement(path="r", model="resnet50", image_size=64, ranks=1, batch_per_rank=4, threads_per_rank=1,
                          steps_measured=5, step_s=0.1, step_s_mean=0.1, busy_s=0.1, allreduce_s=0.0, compute_s=0.08,
                          optimizer_s=0.02, data_s=0.0, allreduce_overlap=overlap)


def test_calibration_records_which_overlap_the_runs_saw() -> None:
    base = load_machine("local")
    assert overlap_mode([_run("none"), _run("none")], base)[0] == "none"
    assert overlap_mode([_run(None)], base) == ("layerwise", "the base profile's (local); the runs did not record it")
    assert overlap_mode([_run("none")], base, "layerwise")[0] == "layerwise"
    with pytest.raises(ValueError, match="different allreduce overlaps"):
        overlap_mode([_run("none"), _run("layerwise")], base)
    fit = ComputeFit(sustained_fraction=0.3, half_efficiency_batch=2.0, measured_images_per_s={}, runs=[])
    data = calibrated_profile(base, compute=fit, overlap=("none", "recorded by the runs"))
    assert parse_machine(data).network.overlap == "none"
    assert data["calibration"]["overlap"]["network.overlap"] == "none"


def test_roofline_calibration_recovers_scale_and_half_batch() -> None:
    # Synthetic runs made by the model itself with scale 0.5 and h = 3: the fit must find them again.
    runs, points = [], {}
    for b in (2, 4, 8, 16):
        device_s, host_s = 0.01 * b + 0.02, 0.005
        measured = device_s * (1 + 3.0 / b) / 0.5 + host_s
        run = RunMeasurement(path=f"r{b}", model="resnet50", image_size=64, ranks=1, batch_per_rank=b,
                             threads_per_rank=1, steps_measured=5, step_s=measured, step_s_mean=measured,
                             busy_s=measured, allreduce_s=0.0, compute_s=measured, optimizer_s=0.0, data_s=0.0)
        runs.append(run)
        points[run.path] = RooflinePoint(device_s=device_s, host_s=host_s, batch_per_device=float(b))
    fit = fit_compute(runs, 1e11, roofline=lambda run: points[run.path])
    assert fit.efficiency_scale == pytest.approx(0.5, rel=1e-6)
    assert fit.roofline_half_batch == pytest.approx(3.0, rel=1e-6)
    assert max(abs(r["relative"]) for r in fit.runs) < 1e-6
    profile = parse_machine(calibrated_profile(load_machine("local"), compute=fit))
    assert profile.compute.model == "roofline" and profile.compute.efficiency_scale == pytest.approx(0.5)


def test_data_bound_gpu_node_is_predicted_data_bound() -> None:
    machine = load_machine("dgx-h200")
    free = predict_point("resnet50", machine, 1, 8 * 256, 1, precision="bf16")
    doc = machine.to_dict()
    doc["compute"]["data_images_per_s"] = 8 * 2000.0          # loaders deliver 2,000 images/s per GPU
    starved = predict_point("resnet50", parse_machine(doc), 1, 8 * 256, 1, precision="bf16")
    assert free["data_exposed_s"] == 0
    assert starved["images_per_s"] == pytest.approx(8 * 2000.0)
    assert starved["data_exposed_s"] > 0 and starved["iteration_s"] == pytest.approx(starved["data_s"])


def test_sustained_model_is_still_available() -> None:
    doc = load_machine("stampede2-knl").to_dict()
    doc["compute"] = {"model": "sustained", "sustained_fraction": 0.35, "half_efficiency_gflop": 340}
    r = predict_point("resnet50_v1", parse_machine(doc), 2048, 32768, 90)
    w = load_workload("resnet50_v1")
    expected = w.flops_per_image * (16 + 340e9 / w.flops_per_image) / (6.1e12 * 0.35)
    assert r["compute_s"] == pytest.approx(expected)


def test_vectorised_predictions_equal_scalar_calls_on_gpu_profiles() -> None:
    params = PerfParams.from_machine(load_machine("dgx-h200"), "bf16")
    w = load_workload("resnet50")
    nodes = np.array([1, 2, 4, 16, 64, 128])
    batch = nodes * 8 * np.array([16, 32, 64, 128, 256, 8])
    grid = predict_from(w, params, nodes, batch, 90)
    for i in range(nodes.size):
        one = predict("resnet50", "dgx-h200", int(nodes[i]), int(batch[i]), 90, precision="bf16").record(0)
        assert grid.record(i) == pytest.approx(one)


def test_rates_check_their_inputs() -> None:
    rates = DeviceRates(matrix_flops_per_s=1e12, channels_half=0, grouped_efficiency=1, memory_bytes_per_s=1e11,
                        activation_bytes=4, kernel_s=0)
    assert rates.library_memory_bytes_per_s == rates.memory_bytes_per_s
    with pytest.raises(ValueError, match="needs rates"):
        PerfParams.from_machine(load_machine("local")).replace(rates=None)


def test_noise_that_inverts_two_batches_keeps_h_and_fits_the_rate() -> None:
    # On a shared machine b=4 once ran faster per step than b=2: calibration must not fail on it.
    runs = [RunMeasurement(path=f"r{b}", model="resnet50", image_size=64, ranks=1, batch_per_rank=b,
                           threads_per_rank=1, steps_measured=5, step_s=t, step_s_mean=t, busy_s=t, allreduce_s=0.0,
                           compute_s=t, optimizer_s=0.0, data_s=0.0) for b, t in ((2, 0.9), (4, 0.8))]
    points = {"r2": RooflinePoint(0.4, 0.0, 2.0), "r4": RooflinePoint(0.8, 0.0, 4.0)}
    fit = fit_compute(runs, 1e11, default_half_efficiency_batch=2.0, roofline=lambda run: points[run.path],
                      default_roofline_half_batch=1.0)
    assert fit.half_efficiency_batch == 2.0 and fit.roofline_half_batch == 1.0
    assert fit.sustained_fraction > 0 and fit.efficiency_scale > 0
    assert sum("do not grow with the batch" in note for note in fit.notes) == 2
