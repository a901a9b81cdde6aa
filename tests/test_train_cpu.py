"""PyTorch on one CPU core: ``larscale train --cpu-kernels fast`` and ``benchmarks/bench_cpu.py --quick``.

On one thread and under 16 images PyTorch runs 1x1 stride-1 convolutions on its own GEMM path, the rest on oneDNN;
``--cpu-kernels fast`` sends those to oneDNN too, and makes ``--optimizer sgd`` PyTorch's fused SGD. Checked with
PyTorch's profiler (which kernels ran) and against the default's results (the same arithmetic, rounded apart).
The benchmark runs for real with its smoke settings; speeds are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from larscale import UsageError
from scaling.config import TrainConfig, check_config
from tests.conftest import REPO

# ResNet-50's 1x1 stride-1 convolutions: the first and last of each of the 16 bottlenecks, and layer1's shortcut.
RESNET50_POINTWISE = 33


@pytest.fixture
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def step_with_profile(fast: bool) -> tuple[set[str], list, int]:
    """One forward and backward of ResNet-50 (32 px, 4 images, channels-last input, BatchNorm in eval mode): the
    operators that ran, the logits and gradients, and the number of convolutions re-routed."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from scaling.framework_torch import build_torch_model, route_convolutions

    torch.manual_seed(0)
    model = build_torch_model("resnet50", 10, 32)
    routed = route_convolutions(model) if fast else 0
    # BatchNorm on its running statistics: batch statistics of 4 images of 1x1 pixels (the last stage at 32 px)
    # would magnify a rounding difference a thousandfold
    model.eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        logits = model(images)
        logits.square().mean().backward()
    return {e.key for e in prof.key_averages()}, [logits.detach(), *(p.grad for p in model.parameters())], routed


def test_fast_cpu_kernels_run_every_convolution_on_onednn_with_the_default_results(one_thread: None) -> None:
    import torch

    ops_default, results_default, none_routed = step_with_profile(fast=False)
    ops_onednn, results_onednn, routed = step_with_profile(fast=True)
    assert none_routed == 0 and routed == RESNET50_POINTWISE
    # the default sends the 1x1 convolutions to PyTorch's GEMM path: the case the option exists for
    assert "aten::_slow_conv2d_forward" in ops_default and "aten::_slow_conv2d_backward" in ops_default
    assert "aten::mkldnn_convolution" in ops_onednn
    assert not {op for op in ops_onednn if op.startswith("aten::_slow_conv2d")}
    for default, onednn in zip(results_default, results_onednn, strict=True):
        torch.testing.assert_close(onednn, default, rtol=1e-4, atol=1e-5 * float(default.abs().max()))


def test_cpu_kernels_is_refused_where_it_chooses_nothing() -> None:
    for config, word in ((TrainConfig(framework="tensorflow", cpu_kernels="fast"), "TensorFlow"),
                         (TrainConfig(device="cuda", cpu_kernels="fast"), "--device cuda")):
        with pytest.raises(UsageError, match=f"--cpu-kernels fast.*{word}"):
            check_config(config)
    check_config(TrainConfig(cpu_kernels="fast"))


def test_bench_cpu_quick_reports_rates_flops_and_peak_per_core(tmp_path) -> None:
    from analysis.workload import load_workload
    from larscale.machine import load_machine

    out = tmp_path / "cpu.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_cpu.py", "--quick", "--frameworks", "torch",
                           "--precisions", "fp32", "--torch-variants", "default,fast", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["core"] in os.sched_getaffinity(0)
    rows = {r["contender"]: r for r in report["rows"]}
    assert set(rows) == {"torch-fp32", "torch-fp32+fast"}
    flops = load_workload("resnet50", 64).flops_per_image
    devices = load_machine("local").node.devices
    peak = devices.peak_tflops["fp32"] * 1e3 / devices.compute_units
    for row in rows.values():
        assert (row["model"], row["image_size"], row["batch"]) == ("resnet50", 64, 4)
        assert row["threads_per_rank"] == 1 and len(row["step_s_repeats"]) == 1
        assert 0 < row["compute_s"] < row["step_s"]
        assert row["images_per_s"] == pytest.approx(4 / row["step_s"])
        assert row["gflops_per_s"] == pytest.approx(row["images_per_s"] * flops / 1e9)
        assert row["core_peak_gflops"] == pytest.approx(peak)
        assert row["share_of_peak"] == pytest.approx(row["gflops_per_s"] / peak)
    # the trainer took the option: its summary counts the convolutions it sent to oneDNN
    assert (rows["torch-fp32"]["convolutions_rerouted"], rows["torch-fp32+fast"]["convolutions_rerouted"]) == \
        (0, RESNET50_POINTWISE)
    # no TensorFlow run, so no ratio and no verdict
    assert report["ratios"] == [] and report["passed"] is None
    assert "| resnet50 | 64 | torch-fp32+fast |" in proc.stdout


def test_fast_cpu_kernels_fuse_sgd_to_the_default_loops_results_within_rounding() -> None:
    """``--optimizer sgd``: the default is PyTorch's per-tensor loop; ``fast`` its fused SGD (one pass over each
    tensor), which gives the same weights and momentum up to rounding (a tensor's last elements, under one vector,
    round apart), with the trainer's parameter groups (weight decay on weights only)."""
    import torch

    from scaling.framework_torch import build_torch_model, make_torch_optimizer
    from scaling.runplan import make_plan

    finals = []
    for kernels in ("fast", "default"):
        config = TrainConfig(model="tiny", optimizer="sgd", weight_decay=5e-4, cpu_kernels=kernels)
        plan = make_plan(config, ranks=1, train_size=1000, image_size=16, num_classes=10)
        torch.manual_seed(0)
        model = build_torch_model("tiny", 10, 16)
        optimizer = make_torch_optimizer(config, plan, model)
        assert [bool(group["fused"]) for group in optimizer.param_groups] == [kernels == "fast"] * 2
        gradients = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gradients)
            optimizer.step()
        finals.append([*model.parameters(), *(optimizer.state[p]["momentum_buffer"] for p in model.parameters())])
    assert plan.weight_decay > 0 and plan.momentum > 0
    for fast, default in zip(*finals, strict=True):
        torch.testing.assert_close(fast, default, rtol=4 * 3 * torch.finfo(torch.float32).eps, atol=0)
