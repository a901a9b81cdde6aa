"""Time one optimizer step on ResNet-50's parameter shapes: scaling.optim_fast.FastLARS against its yardsticks.

    python benchmarks/bench_lars.py [--device cpu|cuda] [--reps 21] [--threads 1] [--chunk-bytes N ...] [--json F]

Measured side by side in one process: each repetition runs one ``step()`` of every contender, in a shuffled order,
and the report gives per-contender medians and the ratios against their targets. On the CPU
(``torch.set_num_threads(1)`` by default), for LARS as constructed by default there (the chunked path):

* LARS / ``torch.optim.SGD(momentum, weight_decay, foreach=True)``  — target ≤ 1.3
* LARS / a per-tensor Python-loop LARS with one ``.item()`` per tensor (the usual style) — target ≤ 0.8

On a GPU (``--device cuda``), for LARS as constructed by default there (the fused path), each step timed from a
synchronised device to a synchronised device:

* LARS / SGD foreach — target ≤ 1.3;   LARS / ``SGD(fused=True)`` — target ≤ 2

The other path of LARS (``fused=True`` on the CPU, ``fused=False`` on the GPU) and SGD fused (where this torch has
it for the device) are timed too and reported without a target. Every contender owns its own parameters, gradients
and buffers (fp32, the 161 tensors of ResNet-50, 25.6 M values: about 100 MB each), so no contender warms the
cache for another. Prints a summary and one ``RESULT {json}`` line; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scaling.optim_fast import FastLARS as LARS  # noqa: E402

TARGET_VS_SGD = 1.3
TARGET_VS_PYTHON = 0.8      # CPU only
TARGET_VS_SGD_FUSED = 2.0   # GPU only
LR, MOMENTUM, WEIGHT_DECAY, TRUST = 0.1, 0.9, 1e-4, 0.001


def resnet50_shapes_from_architecture(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """ResNet-50's parameter shapes in ``model.parameters()`` order (v1 and v1.5 have the same shapes)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out = planes * 4
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,),
                       (out, planes, 1, 1), (out,), (out,)]
            if block == 0:  # projection shortcut
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    return shapes + [(num_classes, 2048), (num_classes,)]


def resnet50_shapes() -> tuple[list[tuple[int, ...]], str]:
    """Shapes from ``models.get("resnet50")`` when the models package provides it, else from the architecture."""
    try:
        import models

        model = models.get("resnet50")
        return [tuple(p.shape) for p in model.parameters()], "models.get('resnet50')"
    except Exception:  # noqa: BLE001 - any failure falls back to the hard-coded architecture
        return resnet50_shapes_from_architecture(), "hard-coded ResNet-50 architecture"


def make_params(shapes: list[tuple[int, ...]], seed: int, device: str = "cpu") -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(device))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


class PythonLoopLARS:
    """LARS as it is usually written: a Python loop over tensors, one ``.item()`` each to get the local LR."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float,
                 trust_coefficient: float) -> None:
        self.params, self.lr, self.momentum = params, lr, momentum
        self.weight_decay, self.trust_coefficient = weight_decay, trust_coefficient
        self.buffers = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        for p, buf in zip(self.params, self.buffers, strict=True):
            g = p.grad
            if p.ndim <= 1:  # biases and BN: plain momentum SGD
                buf.mul_(self.momentum).add_(g, alpha=self.lr)
            else:
                w_norm, g_norm = torch.norm(p), torch.norm(g)
                trust = torch.where((w_norm > 0) & (g_norm > 0),
                                    self.trust_coefficient * w_norm / (g_norm + self.weight_decay * w_norm), 1.0)
                local_lr = self.lr * trust.item()
                buf.mul_(self.momentum).add_(g.add(p, alpha=self.weight_decay), alpha=local_lr)
            p.sub_(buf)


def fused_sgd_step(shapes: list[tuple[int, ...]], device: str) -> tuple[Callable[[], None] | None, str]:
    """``SGD(fused=True).step`` on its own parameters, or None and the reason when this torch lacks it here."""
    try:
        sgd = torch.optim.SGD(make_params(shapes, seed=300, device=device), lr=LR, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY, fused=True)
        sgd.step()  # some builds refuse only at the first step
    except (RuntimeError, TypeError, ValueError) as error:
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
    return sgd.step, ""


def contenders(shapes: list[tuple[int, ...]], chunk_sizes: list[int | None], device: str = "cpu"
               ) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """The steps to time (name → step) and the contenders left out with the reason."""
    steps: dict[str, Callable[[], None]] = {}
    left_out: dict[str, str] = {}

    def lars(seed: int, **options) -> Callable[[], None]:
        return LARS(make_params(shapes, seed, device), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                    trust_coefficient=TRUST, **options).step

    steps["lars"] = lars(1)  # the default path for the device
    other = "lars_chunked" if device != "cpu" else "lars_fused"
    steps[other] = lars(2, fused=device == "cpu")
    for i, chunk in enumerate(chunk_sizes):
        steps[f"lars[chunk_bytes={chunk}]"] = lars(10 + i, chunk_bytes=chunk, fused=False)
    sgd = torch.optim.SGD(make_params(shapes, 100, device), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                          foreach=True)
    steps["sgd_foreach"] = sgd.step
    fused_sgd, why = fused_sgd_step(shapes, device)
    if fused_sgd is not None:
        steps["sgd_fused"] = fused_sgd
    else:
        left_out["sgd_fused"] = why
    if device == "cpu":  # on a GPU the per-tensor .item() loop is no yardstick anyone would use
        steps["python_loop_lars"] = PythonLoopLARS(make_params(shapes, 200), LR, MOMENTUM, WEIGHT_DECAY,
                                                   TRUST).step
    return steps, left_out


def measure(steps: dict[str, Callable[[], None]], reps: int, warmup: int, seed: int = 0,
            synchronize: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Interleaved timings: every repetition runs each contender once, in a freshly shuffled order.

    ``synchronize`` (``torch.cuda.synchronize`` on a GPU) runs before the clock starts and before it stops, so a
    step's time is its launches and its kernels, not the queue the previous contender left.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    order = list(steps)
    shuffler = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        shuffler.shuffle(order)
        for name in order:
            synchronize()
            start = time.perf_counter()
            steps[name]()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times


@dataclass(frozen=True)
class Ratio:
    name: str
    numerator: str
    denominator: str
    target: float | None     # None: reported only

    def value(self, medians: dict[str, float]) -> float | None:
        if self.numerator not in medians or self.denominator not in medians:
            return None
        return medians[self.numerator] / medians[self.denominator]


def ratios_for(device: str) -> list[Ratio]:
    """The ratios reported for ``device``, with the targets of benchmarks/README.md."""
    if device == "cpu":
        return [Ratio("lars_over_sgd_foreach", "lars", "sgd_foreach", TARGET_VS_SGD),
                Ratio("lars_over_python_loop", "lars", "python_loop_lars", TARGET_VS_PYTHON),
                Ratio("lars_fused_over_sgd_foreach", "lars_fused", "sgd_foreach", None),
                Ratio("lars_over_sgd_fused", "lars", "sgd_fused", None)]
    return [Ratio("lars_over_sgd_foreach", "lars", "sgd_foreach", TARGET_VS_SGD),
            Ratio("lars_over_sgd_fused", "lars", "sgd_fused", TARGET_VS_SGD_FUSED),
            Ratio("lars_chunked_over_sgd_foreach", "lars_chunked", "sgd_foreach", None)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the tensors live")
    parser.add_argument("--reps", type=int, default=21, help="interleaved repetitions (default 21)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--chunk-bytes", type=int, nargs="*", default=[],
                        help="also time the chunked LARS with these chunk_bytes (0 = one chunk per device and dtype)")
    parser.add_argument("--json", type=Path, help="also write the RESULT object to this file")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        parser.error("--reps and --threads must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    result = run(args.device, args.reps, args.warmup, args.threads, args.chunk_bytes)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


def run(device: str, reps: int, warmup: int = 2, threads: int = 1, chunk_bytes: list[int] | None = None,
        shapes: list[tuple[int, ...]] | None = None, result_line: bool = True) -> dict:
    """Time the contenders, print the summary (and the RESULT line), and return the RESULT object."""
    torch.set_num_threads(threads)
    source = "given shapes"
    if shapes is None:
        shapes, source = resnet50_shapes()
    numel = sum(math.prod(s) for s in shapes)
    steps, left_out = contenders(shapes, list(chunk_bytes or []), device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = measure(steps, reps, warmup, synchronize=sync)
    medians = {name: statistics.median(t) for name, t in times.items()}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {threads} thread(s)"
    print(f"ResNet-50 shapes ({source}): {len(shapes)} tensors, {numel / 1e6:.2f} M fp32 values; "
          f"torch {torch.__version__}, {where}, {reps} interleaved repetitions, load average {load:.1f}")
    for name, median in medians.items():
        quartiles = statistics.quantiles(times[name], n=4) if len(times[name]) >= 2 else [median] * 3
        print(f"  {name:<28} median {median * 1e3:8.3f} ms   "
              f"(quartiles {quartiles[0] * 1e3:.3f}-{quartiles[2] * 1e3:.3f})")
    for name, why in left_out.items():
        print(f"  {name:<28} not timed: {why}")
    values, targets, ok = {}, {}, True
    for ratio in ratios_for(device):
        value = ratio.value(medians)
        if value is None:
            if ratio.target is not None:
                print(f"{ratio.numerator} / {ratio.denominator}: not measured (no {ratio.denominator})")
            continue
        values[ratio.name] = value
        verdict = ""
        if ratio.target is not None:
            targets[ratio.name] = ratio.target
            met = value <= ratio.target
            ok = ok and met
            verdict = f"target <= {ratio.target}  {'ok' if met else 'MISSED'}"
        label = f"{ratio.numerator} / {ratio.denominator}:"
        print(f"{label:<34} {value:.3f}   {verdict}")
    result = {
        "benchmark": "bench_lars", "device": device, "where": where, "shapes_source": source,
        "tensors": len(shapes), "values": numel, "threads": threads, "reps": reps, "torch": torch.__version__,
        "load_average": load, "median_s": medians, "not_timed": left_out, **values, "targets": targets, "ok": ok,
    }
    if result_line:
        print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(main())
