"""One CPU core's training rate per framework and precision, through `larscale train`, beside the core's peak.

Usage (repo root)::

    .venv/bin/python benchmarks/bench_cpu.py [--models resnet50:224,resnet50:64,alexnet_bn:227]
        [--frameworks torch,tensorflow] [--precisions fp32,bf16] [--torch-variants default,fast,fast-nchw]
        [--batch 4] [--steps 8] [--warmup 3] [--repeats 2] [--core N] [--machine local] [--json OUT]
    .venv/bin/python benchmarks/bench_cpu.py --quick        # ResNet-50 at 64 px, few steps: a smoke test
    .venv/bin/python benchmarks/bench_cpu.py --profile resnet50:224   # PyTorch's time per operator, 1 thread

Every contender is one rank of ``python -m scaling.train`` (synthetic data, SGD, ``--threads 1``, no evaluation)
with this process and its children pinned to one core (``os.sched_setaffinity``), so a framework's extra threads
share that core instead of taking another. A contender is framework × precision, and for PyTorch fp32 also the
trainer's CPU options (``--torch-variants``, see ``TORCH_VARIANTS``: ``default``, the trainer's defaults;
``fast``, ``--cpu-kernels fast``: every convolution on oneDNN, SGD fused; ``fast-nchw``, the same with NCHW
activations). Each repeat runs every contender of a model one after the other, so a shared machine's drifts hit
them all; a contender's figure is its fastest repeat's median step after the warm-up steps (from the step logs).

Per contender: seconds per step, images/s, GFLOP/s (the training FLOPs per image of the model's per-layer table,
``analysis.workload``: forward 2·MACs, backward twice that but for the first layer's input) and that rate's share
of the core's peak for the precision (the machine profile's ``peak_tflops`` ÷ the device's cores; "-" where the
profile has no peak for the precision). Per model: PyTorch fp32 ÷ TensorFlow fp32 images/s, for each PyTorch
variant. Target (issue #27): **≥ 0.9** for ResNet-50 and AlexNet-BN. AlexNet-BN has a fixed classifier head and
runs at its native 227 px only.

``--profile MODEL:SIZE`` runs no trainer: it builds the model with the trainer's own set-up (scaling.device,
scaling.framework_torch), pinned, 1 thread, ``--batch`` images, and prints torch.profiler's self time per operator
for each ``--torch-variants`` entry, so one sees where a step's time goes (convolutions by kernel path, BatchNorm,
layout copies).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import run, step_times  # noqa: E402

from larscale.runformat import read_steps, step_log_path  # noqa: E402

TARGET = 0.9  # PyTorch fp32 images/s ÷ TensorFlow fp32 images/s on one core
QUICK = {"models": "resnet50:64", "steps": 4, "warmup": 2, "repeats": 1}
# PyTorch fp32 variants: the trainer options each adds (the trainer's CPU default is channels-last activations)
TORCH_VARIANTS = {"default": [], "fast": ["--cpu-kernels", "fast"],
                  "fast-nchw": ["--cpu-kernels", "fast", "--memory-format", "contiguous"]}


@dataclass(frozen=True)
class Contender:
    framework: str
    precision: str
    variant: str = "default"  # a TORCH_VARIANTS key (PyTorch fp32); TensorFlow has no such choice

    @property
    def name(self) -> str:
        kernels = f"+{self.variant}" if self.variant != "default" else ""
        return f"{self.framework}-{self.precision}{kernels}"


def contenders(frameworks: list[str], precisions: list[str], torch_variants: list[str]) -> list[Contender]:
    out = []
    for framework in frameworks:
        for precision in precisions:
            variants = torch_variants if framework == "torch" and precision == "fp32" else ["default"]
            out.extend(Contender(framework, precision, v) for v in variants)
    return out


def core_peak_gflops(machine: str, precision: str) -> float | None:
    """One core's peak for ``precision`` from the machine profile (peak per device ÷ the device's cores)."""
    from larscale.machine import load_machine

    devices = load_machine(machine).node.devices
    peak = devices.peak_tflops.get(precision)
    return None if peak is None else peak * 1e3 / (devices.compute_units or 1)


def train_once(c: Contender, model: str, image: int, batch: int, steps: int, warmup: int, out: Path) -> dict:
    """One pinned 1-rank trainer run: its median step and compute seconds after the warm-up."""
    argv = [sys.executable, "-m", "scaling.train", "--framework", c.framework, "--model", model,
            "--dataset", "synthetic", "--image-size", str(image), "--batch-per-rank", str(batch),
            "--steps", str(steps + warmup), "--optimizer", "sgd", "--lr", "0.01", "--threads", "1",
            "--precision", c.precision, "--measure-warmup-steps", str(warmup), "--log-every", "1000",
            "--no-eval", "--out", str(out)]
    argv += TORCH_VARIANTS[c.variant]
    run(argv)
    summary = json.loads((out / "summary.json").read_text())
    compute = [r["compute_s"] for r in read_steps(step_log_path(out, 0))[warmup:]]
    return {"step_s": statistics.median(step_times(out, 1, warmup)), "compute_s": statistics.median(compute),
            "threads_per_rank": summary["threads_per_rank"],
            "convolutions_rerouted": summary["backend"].get("convolutions_rerouted")}


def measure(args: argparse.Namespace, core: int) -> dict:
    from analysis.workload import load_workload

    field = contenders(args.frameworks, args.precisions, args.torch_variants)
    rows, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="larscale-bench-cpu-") as tmp:
        for spec in args.models:
            model, image = spec.split(":")[0], int(spec.split(":")[1])
            flops = load_workload(model, int(image)).flops_per_image
            runs: dict[Contender, list[dict]] = {c: [] for c in field}
            for repeat in range(args.repeats):
                for c in field:
                    runs[c].append(train_once(c, model, image, args.batch, args.steps, args.warmup,
                                              Path(tmp) / f"{model}-{image}-{c.name}-{repeat}"))
                print(f"{model} {image} px repeat {repeat}: " + ", ".join(
                    f"{c.name} {r[-1]['step_s']:.3f} s/step" for c, r in runs.items()), flush=True)
            for c, reps in runs.items():
                best = min(reps, key=lambda r: r["step_s"])
                images_per_s = args.batch / best["step_s"]
                peak = core_peak_gflops(args.machine, c.precision)
                gflops = images_per_s * flops / 1e9
                rows.append({"model": model, "image_size": image, "contender": c.name, "framework": c.framework,
                             "precision": c.precision, "torch_variant": c.variant, "batch": args.batch,
                             "step_s": best["step_s"], "compute_s": best["compute_s"],
                             "step_s_repeats": [r["step_s"] for r in reps], "images_per_s": images_per_s,
                             "gflops_per_image": flops / 1e9, "gflops_per_s": gflops, "core_peak_gflops": peak,
                             "share_of_peak": None if peak is None else gflops / peak,
                             "threads_per_rank": best["threads_per_rank"],
                             "convolutions_rerouted": best["convolutions_rerouted"]})
            mine = {r["contender"]: r for r in rows if r["model"] == model and r["image_size"] == image}
            tf = mine.get("tensorflow-fp32")
            for c in field:
                if tf is not None and c.framework == "torch" and c.precision == "fp32":
                    ratios.append({"model": model, "image_size": image, "torch": c.name,
                                   "torch_over_tensorflow_fp32": mine[c.name]["images_per_s"] / tf["images_per_s"]})
    return {"rows": rows, "ratios": ratios}


def table(rows: list[dict]) -> str:
    lines = ["| model | px | contender | s/step | images/s | GFLOP/s | core peak GFLOP/s | share of peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["core_peak_gflops"] is None else f"{r['core_peak_gflops']:.0f}"
        share = "-" if r["share_of_peak"] is None else f"{r['share_of_peak'] * 100:.0f} %"
        lines.append(f"| {r['model']} | {r['image_size']} | {r['contender']} | {r['step_s']:.3f} | "
                     f"{r['images_per_s']:.2f} | {r['gflops_per_s']:.1f} | {peak} | {share} |")
    return "\n".join(lines)


def profile_variant(model_name: str, image: int, variant: str, args: argparse.Namespace) -> None:
    """torch.profiler's self CPU time per operator for a few training steps of the trainer's PyTorch set-up."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from scaling.device import setup_torch
    from scaling.framework_torch import build_torch_model, route_convolutions

    device = setup_torch("cpu", "fp32", 1, 0, 1)
    torch.manual_seed(0)
    model = build_torch_model(model_name, 1000, image)
    fast = variant.startswith("fast")
    routed = route_convolutions(model) if fast else 0
    images = torch.randn(args.batch, 3, image, image)
    if variant != "fast-nchw":
        images = device.to_input(images)
    labels = torch.randint(0, 1000, (args.batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=fast or None)
    criterion = torch.nn.CrossEntropyLoss()

    def step() -> None:
        criterion(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    per_step = (time.perf_counter() - start) / args.steps
    print(f"{model_name} {image} px, batch {args.batch}, variant {variant} ({routed} convolutions re-routed), "
          f"channels-last input {variant != 'fast-nchw'}: {per_step:.3f} s per profiled step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=40))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50:224,resnet50:64,alexnet_bn:227",
                        help="comma list of model:image_size")
    parser.add_argument("--frameworks", default="torch,tensorflow")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--torch-variants", default=",".join(TORCH_VARIANTS),
                        help=f"PyTorch fp32 variants to compare, of {', '.join(TORCH_VARIANTS)}")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out at the start of each run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--core", type=int, help="the core to pin to (default: the last one this process may use)")
    parser.add_argument("--machine", default="local", help="machine profile whose peaks are printed")
    parser.add_argument("--quick", action="store_true", help="smoke test: " + ", ".join(
        f"{k} {v}" for k, v in QUICK.items()))
    parser.add_argument("--profile", metavar="MODEL:SIZE", help="print PyTorch's per-operator profile instead")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key in ("models", "frameworks", "precisions", "torch_variants"):
        setattr(args, key, [v.strip() for v in getattr(args, key).split(",") if v.strip()])
    unknown = sorted(set(args.torch_variants) - set(TORCH_VARIANTS))
    if unknown:
        parser.error(f"--torch-variants {','.join(unknown)}: choose of {', '.join(TORCH_VARIANTS)}")
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[-1] if args.core is None else args.core
    if core not in allowed:
        parser.error(f"--core {core}: this process may run on cores {allowed} only")
    os.sched_setaffinity(0, {core})  # the trainer runs and their threads inherit it
    if args.profile:
        model_name, image = args.profile.split(":")
        for variant in args.torch_variants:
            profile_variant(model_name, int(image), variant, args)
        return 0
    load_before = os.getloadavg()[0]
    results = measure(args, core)
    print(table(results["rows"]))
    for r in results["ratios"]:
        print(f"{r['model']} {r['image_size']} px: {r['torch']} / tensorflow-fp32 = "
              f"{r['torch_over_tensorflow_fp32']:.3f} (target >= {TARGET})")
    gated = [r for r in results["ratios"] if r["model"] in ("resnet50", "alexnet_bn")]
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "core": core, "machine": args.machine,
              "load_average": [load_before, os.getloadavg()[0]], "batch": args.batch, "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats, "target_ratio": TARGET, **results,
              # met when, per model and size, the best PyTorch fp32 variant reaches the target
              "passed": None if not gated else all(
                  max(g["torch_over_tensorflow_fp32"] for g in gated
                      if (g["model"], g["image_size"]) == key) >= TARGET
                  for key in {(g["model"], g["image_size"]) for g in gated})}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print("RESULT " + json.dumps(report), flush=True)
    return 1 if report["passed"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
