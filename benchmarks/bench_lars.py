"""Time one optimizer step on ResNet-50's parameter shapes: scaling.optim.LARS against two yardsticks.

    python benchmarks/bench_lars.py [--reps 21] [--threads 1] [--chunk-bytes N ...] [--json FILE]

Measured side by side in one process on the CPU with ``torch.set_num_threads(1)`` (default): each repetition runs
one ``step()`` of every contender, in a shuffled order, and the report gives per-contender medians and the ratios

* LARS / ``torch.optim.SGD(momentum, weight_decay, foreach=True)``  — target ≤ 1.3
* LARS / a per-tensor Python-loop LARS with one ``.item()`` per tensor (the usual style) — target ≤ 0.8

Every contender owns its own parameters, gradients and buffers (fp32, the 161 tensors of ResNet-50, 25.6 M
values: about 100 MB each), so no contender warms the cache for another. Prints a summary and one
``RESULT {json}`` line; exits 1 when a target is missed.
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scaling.optim import LARS  # noqa: E402

TARGET_VS_SGD = 1.3
TARGET_VS_PYTHON = 0.8
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


def make_params(shapes: list[tuple[int, ...]], seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) / math.sqrt(fan_in))
        p.grad = torch.randn(shape, generator=gen) * 1e-3
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


def contenders(shapes: list[tuple[int, ...]], chunk_sizes: list[int | None]) -> dict[str, Callable[[], None]]:
    steps: dict[str, Callable[[], None]] = {}
    for i, chunk in enumerate(chunk_sizes):
        opt = LARS(make_params(shapes, seed=1 + i), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                   trust_coefficient=TRUST, chunk_bytes=chunk)
        name = "lars" if chunk is None else f"lars[chunk_bytes={chunk}]"
        steps[name] = opt.step
    sgd_params = make_params(shapes, seed=100)
    sgd = torch.optim.SGD(sgd_params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)
    steps["sgd_foreach"] = sgd.step
    steps["python_loop_lars"] = PythonLoopLARS(make_params(shapes, seed=200), LR, MOMENTUM, WEIGHT_DECAY,
                                               TRUST).step
    return steps


def measure(steps: dict[str, Callable[[], None]], reps: int, warmup: int, seed: int = 0) -> dict[str, list[float]]:
    """Interleaved timings: every repetition runs each contender once, in a freshly shuffled order."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    order = list(steps)
    shuffler = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        shuffler.shuffle(order)
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=21, help="interleaved repetitions (default 21)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--chunk-bytes", type=int, nargs="*", default=[],
                        help="also time LARS with these chunk_bytes values (0 = one chunk per device and dtype)")
    parser.add_argument("--json", type=Path, help="also write the RESULT object to this file")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        parser.error("--reps and --threads must be at least 1")

    torch.set_num_threads(args.threads)
    shapes, source = resnet50_shapes()
    numel = sum(math.prod(s) for s in shapes)
    steps = contenders(shapes, [None, *args.chunk_bytes])
    times = measure(steps, args.reps, args.warmup)
    medians = {name: statistics.median(t) for name, t in times.items()}
    vs_sgd = medians["lars"] / medians["sgd_foreach"]
    vs_python = medians["lars"] / medians["python_loop_lars"]

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"ResNet-50 shapes ({source}): {len(shapes)} tensors, {numel / 1e6:.2f} M fp32 values; "
          f"torch {torch.__version__}, {args.threads} thread(s), {args.reps} interleaved repetitions, "
          f"load average {load:.1f}")
    for name, median in medians.items():
        quartiles = statistics.quantiles(times[name], n=4) if len(times[name]) >= 2 else [median] * 3
        print(f"  {name:<28} median {median * 1e3:8.2f} ms   "
              f"(quartiles {quartiles[0] * 1e3:.2f}-{quartiles[2] * 1e3:.2f})")
    ok_sgd, ok_python = vs_sgd <= TARGET_VS_SGD, vs_python <= TARGET_VS_PYTHON
    print(f"LARS / SGD(foreach):          {vs_sgd:.3f}   target <= {TARGET_VS_SGD}  {'ok' if ok_sgd else 'MISSED'}")
    print(f"LARS / python-loop LARS:      {vs_python:.3f}   target <= {TARGET_VS_PYTHON}  "
          f"{'ok' if ok_python else 'MISSED'}")
    result = {
        "benchmark": "bench_lars", "shapes_source": source, "tensors": len(shapes), "values": numel,
        "threads": args.threads, "reps": args.reps, "torch": torch.__version__, "load_average": load,
        "median_s": medians, "lars_over_sgd_foreach": vs_sgd, "lars_over_python_loop": vs_python,
        "targets": {"lars_over_sgd_foreach": TARGET_VS_SGD, "lars_over_python_loop": TARGET_VS_PYTHON},
        "ok": ok_sgd and ok_python,
    }
    print("RESULT " + json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
