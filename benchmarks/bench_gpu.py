"""A training loop as a user writes it against `larscale train`, eager and compiled, and the LARS step against SGD:
side by side in one run, on this project's ResNet-50 (on a GPU: bf16 autocast, channels-last, batch 256,
synthetic tensors).

    python benchmarks/bench_gpu.py                                   # on a CUDA machine: the full comparison
    python benchmarks/bench_gpu.py --device cpu --image-size 32 --batch 4 --steps 3 --warmup 2 --rounds 1 \\
        --rows bare_eager_lars larscale_eager lars_step               # smoke mode on a CPU: the same logic, tiny

Rows (each measured once per round; the rounds interleave them in a shuffled order, so a drifting machine
moves every row alike):

    bare_eager_lars      the loop below with scaling.optim_fast.FastLARS: model, fixed random batch on the device,
                         autocast, cross-entropy, backward, step; nothing else
    bare_eager_sgd       the same with torch.optim.SGD(momentum, weight decay, foreach=True)
    bare_compiled_lars   the same as bare_eager_lars with torch.compile(model)
    larscale_eager       `larscale train` (LARS, synthetic data) under `horovodrun -np 1 --gloo`, images/s from
                         its summary.json (the first --warmup steps left out)
    larscale_compile     the same with --compile
    lars_step            one optimizer step on ResNet-50's parameters: LARS (the device's default path) against
                         SGD foreach and SGD fused (benchmarks/bench_lars.py, same process)

Ratios and their targets (issue #14; checked on a GPU only, printed in smoke mode):

    larscale_eager / bare_eager_lars         >= 0.97
    larscale_compile / bare_compiled_lars    >= 0.95
    LARS step / SGD foreach step             <= 1.3
    LARS step / SGD fused step               <= 2

A row that fails (a missing flag, a crash, the deadline) is reported with its reason, its ratios as unmeasured,
and the run goes on. Everything a row writes (larscale run directories, logs) lands under --out. Prints one
``RESULT {json}`` line; exit status 1 when a row failed or a measured ratio missed its target.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import models  # noqa: E402
from scaling.optim_fast import FastLARS as LARS  # noqa: E402

ROWS = ("bare_eager_lars", "bare_eager_sgd", "bare_compiled_lars", "larscale_eager", "larscale_compile", "lars_step")
LR, MOMENTUM, WEIGHT_DECAY, TRUST = 0.1, 0.9, 5e-4, 0.001


@dataclass(frozen=True)
class Target:
    name: str
    numerator: str
    denominator: str
    low: float | None = None    # the ratio must be at least this
    high: float | None = None   # ... or at most this

    def met(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def describe(self) -> str:
        return f">= {self.low}" if self.low is not None else f"<= {self.high}"


TARGETS = (
    Target("larscale_eager_over_bare_eager", "larscale_eager", "bare_eager_lars", low=0.97),
    Target("larscale_compile_over_bare_compiled", "larscale_compile", "bare_compiled_lars", low=0.95),
    Target("lars_over_sgd_foreach", "lars_step:lars", "lars_step:sgd_foreach", high=1.3),
    Target("lars_over_sgd_fused", "lars_step:lars", "lars_step:sgd_fused", high=2.0),
)
# Reported beside the targets, for the reader.
INFO_RATIOS = (("bare_eager_lars_over_sgd", "bare_eager_lars", "bare_eager_sgd"),
               ("bare_compiled_over_eager", "bare_compiled_lars", "bare_eager_lars"),
               ("larscale_compile_over_eager", "larscale_compile", "larscale_eager"))


@dataclass(frozen=True)
class BenchConfig:
    device: str
    model: str
    batch: int
    image_size: int
    precision: str             # bf16 (autocast) on a GPU, fp32 on a CPU
    channels_last: bool
    steps: int                 # timed steps per measurement
    warmup: int                # untimed steps before them (the first compiled measurement compiles here)
    rounds: int
    out: Path
    launcher: tuple[str, ...]  # what runs `larscale train` as one rank
    deadline: float            # time.monotonic() after which no row starts
    row_timeout_s: float


@dataclass
class Row:
    name: str
    images_per_s: list[float] = field(default_factory=list)
    error: str | None = None
    detail: dict = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return statistics.median(self.images_per_s) if self.images_per_s and self.error is None else None


# ---------------------------------------------------------------- the loop a user writes


class BareLoop:
    """Model, optimizer, one fixed random batch on the device; a step is forward, loss, backward, update."""

    def __init__(self, cfg: BenchConfig, optimizer: str, compiled: bool) -> None:
        torch.manual_seed(0)
        device = torch.device(cfg.device)
        model = models.get(cfg.model, num_classes=1000, image_size=cfg.image_size).to(device)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        if optimizer == "lars":
            self.optimizer = LARS(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                  trust_coefficient=TRUST)
        else:
            self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                             foreach=True)
        self.model = torch.compile(model) if compiled else model
        self.images = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, device=device).contiguous(
            memory_format=memory_format)
        self.labels = torch.randint(0, 1000, (cfg.batch,), device=device)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        self.cfg = cfg

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
        loss.backward()
        self.optimizer.step()

    def measure(self) -> float:
        """Images per second over ``steps`` steps after ``warmup`` untimed ones, device drained at both ends."""
        for _ in range(self.cfg.warmup):
            self.step()
        synchronize(self.cfg.device)
        start = time.perf_counter()
        for _ in range(self.cfg.steps):
            self.step()
        synchronize(self.cfg.device)
        return self.cfg.steps * self.cfg.batch / (time.perf_counter() - start)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- larscale train, one rank


def larscale_command(cfg: BenchConfig, compiled: bool, out: Path) -> list[str]:
    train = [sys.executable, "-m", "larscale", "train", "--model", cfg.model, "--dataset", "synthetic",
             "--device", cfg.device, "--precision", cfg.precision, "--image-size", str(cfg.image_size),
             "--batch-per-rank", str(cfg.batch), "--global-batch", str(cfg.batch), "--optimizer", "lars",
             "--lr", str(LR), "--momentum", str(MOMENTUM), "--weight-decay", str(WEIGHT_DECAY),
             "--trust-coefficient", str(TRUST), "--warmup-steps", "0",
             "--memory-format", "channels_last" if cfg.channels_last else "contiguous",
             "--steps", str(cfg.warmup + cfg.steps), "--measure-warmup-steps", str(cfg.warmup),
             "--no-eval", "--out", str(out)]
    return [*cfg.launcher, *train, *(["--compile"] if compiled else [])]


def run_larscale(cfg: BenchConfig, compiled: bool, label: str) -> tuple[float, dict]:
    """Images/s of one `larscale train` run from its summary; RuntimeError with the reason when it fails."""
    out = cfg.out / label
    out.mkdir(parents=True, exist_ok=True)
    argv = larscale_command(cfg, compiled, out / "run")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    if cfg.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    timeout = max(1.0, min(cfg.row_timeout_s, cfg.deadline - time.monotonic() + cfg.row_timeout_s))
    with (out / "log.txt").open("w") as log:
        log.write(shlex.join(argv) + "\n")
        log.flush()
        try:
            proc = subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"timed out after {timeout:.0f} s (log: {out / 'log.txt'})") from None
        except OSError as error:
            raise RuntimeError(f"cannot start {argv[0]}: {error}") from None
    if proc.returncode != 0:
        lines = [line for line in (out / "log.txt").read_text().splitlines()[1:] if line.strip()]
        raise RuntimeError(f"exit {proc.returncode}: {lines[-1][:300] if lines else '(no output)'}")
    summary_path = out / "run" / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"no {summary_path}")
    summary = json.loads(summary_path.read_text())
    detail = {k: summary[k] for k in ("times", "steps_measured", "warmup_steps_excluded") if k in summary}
    return float(summary["throughput"]["images_per_s"]), detail


# ---------------------------------------------------------------- the LARS step


def lars_step(cfg: BenchConfig) -> dict[str, float]:
    """Median step times (s) of LARS, SGD foreach and SGD fused on ``cfg.model``'s parameter shapes."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_lars

    shapes = [tuple(p.shape) for p in models.get(cfg.model, num_classes=1000, image_size=cfg.image_size).parameters()]
    result = bench_lars.run(cfg.device, reps=max(5, 4 * cfg.steps), warmup=3, shapes=shapes, result_line=False)
    return {name: seconds for name, seconds in result["median_s"].items()}


# ---------------------------------------------------------------- one run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", default="resnet50", choices=models.names())
    parser.add_argument("--batch", type=int, default=256, help="images per step (default 256)")
    parser.add_argument("--image-size", type=int, help="default: the model's (224 for ResNet-50)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--contiguous", action="store_true", help="keep NCHW (default: channels-last)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default 20)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (default all)")
    parser.add_argument("--launcher", default=f"{horovodrun()} -np 1 -H localhost:1 --gloo",
                        help="command that runs `larscale train` as one rank (default: horovodrun, Gloo)")
    parser.add_argument("--deadline-s", type=float, default=330.0,
                        help="start no row after this many seconds (default 330; the rest are reported as skipped)")
    parser.add_argument("--row-timeout-s", type=float, default=240.0, help="limit of one larscale run (default 240)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")) / "bench_gpu",
                        help="folder for run directories and logs (default $OUT/bench_gpu)")
    parser.add_argument("--json", type=Path, help="also write the RESULT object to this file")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device (smoke mode: --device cpu)")
    image_size = args.image_size or models.input_size(args.model)
    try:
        models.get(args.model, num_classes=1000, image_size=image_size)
    except ValueError as error:
        parser.error(f"--model {args.model} --image-size {image_size}: {error}")

    started = time.monotonic()
    cfg = BenchConfig(device=args.device, model=args.model, batch=args.batch, image_size=image_size,
                      precision=args.precision or ("bf16" if args.device == "cuda" else "fp32"),
                      channels_last=not args.contiguous, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                      out=args.out, launcher=tuple(shlex.split(args.launcher)), deadline=started + args.deadline_s,
                      row_timeout_s=args.row_timeout_s)
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.device == "cuda":
        torch.backends.cudnn.benchmark = True  # what a user's loop sets, and what larscale train sets
    else:
        torch.set_num_threads(1)
    where = torch.cuda.get_device_name() if cfg.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"bench_gpu: {cfg.model} {cfg.image_size} px, batch {cfg.batch}, {cfg.precision}, "
          f"{'channels-last' if cfg.channels_last else 'NCHW'}, on {where}, torch {torch.__version__}; "
          f"{cfg.rounds} round(s) of {cfg.warmup} + {cfg.steps} steps; rows: {', '.join(args.rows)}", flush=True)

    rows = {name: Row(name) for name in args.rows}
    loops: dict[str, BareLoop] = {}
    loop_kinds = {"bare_eager_lars": ("lars", False), "bare_eager_sgd": ("sgd", False),
                  "bare_compiled_lars": ("lars", True)}
    measurers: dict[str, Callable[[int], float]] = {}
    for name in rows:
        if name in loop_kinds:
            def measure_bare(round_index: int, name: str = name) -> float:
                if name not in loops:
                    loops[name] = BareLoop(cfg, *loop_kinds[name])
                return loops[name].measure()
            measurers[name] = measure_bare
        elif name in ("larscale_eager", "larscale_compile"):
            def measure_larscale(round_index: int, name: str = name) -> float:
                if cfg.device == "cuda":
                    torch.cuda.empty_cache()  # leave the GPU's memory to the run
                rate, detail = run_larscale(cfg, name == "larscale_compile", f"{name}-{round_index}")
                rows[name].detail[f"round{round_index}"] = detail
                return rate
            measurers[name] = measure_larscale

    shuffler = random.Random(0)
    for round_index in range(cfg.rounds):
        order = [n for n in rows if n in measurers]
        shuffler.shuffle(order)
        for name in order:
            row = rows[name]
            if row.error is not None:
                continue  # a row that failed once is not retried: its reason stands
            if time.monotonic() > cfg.deadline:
                if not row.images_per_s:
                    row.error = f"skipped: --deadline-s {args.deadline_s:.0f} reached"
                continue
            t0 = time.monotonic()
            try:
                rate = measurers[name](round_index)
            except Exception as error:  # noqa: BLE001 - any failure is this row's, reported, and the run goes on
                row.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:400]
                print(f"  round {round_index}: {name:<20} FAILED {row.error}", flush=True)
                continue
            row.images_per_s.append(rate)
            print(f"  round {round_index}: {name:<20} {rate:10.1f} img/s   ({time.monotonic() - t0:.0f} s)",
                  flush=True)
    loops.clear()
    if cfg.device == "cuda":
        torch.cuda.empty_cache()

    step_times: dict[str, float] = {}
    if "lars_step" in rows:
        if time.monotonic() > cfg.deadline:
            rows["lars_step"].error = f"skipped: --deadline-s {args.deadline_s:.0f} reached"
        else:
            try:
                step_times = lars_step(cfg)
                rows["lars_step"].detail = {"median_s": step_times}
            except Exception as error:  # noqa: BLE001
                rows["lars_step"].error = f"{type(error).__name__}: {error}"[:400]
    return report(cfg, rows, step_times, args.json, time.monotonic() - started)


def horovodrun() -> str:
    """horovodrun beside this interpreter (the venv's), else the one on the PATH."""
    beside = Path(sys.executable).parent / "horovodrun"
    return str(beside) if beside.exists() else "horovodrun"


def report(cfg: BenchConfig, rows: dict[str, Row], step_times: dict[str, float], json_path: Path | None,
           elapsed_s: float) -> int:
    values: dict[str, float] = {name: row.median for name, row in rows.items() if row.median is not None}
    # step times enter the ratios as times (smaller is better), named lars_step:<contender>
    values.update({f"lars_step:{k}": v for k, v in step_times.items()})
    print(f"\n{'row':<22} {'img/s (median)':>15}   per round / status")
    for name, row in rows.items():
        if name == "lars_step":
            continue
        status = row.error or " ".join(f"{r:.1f}" for r in row.images_per_s)
        median = f"{row.median:15.1f}" if row.median is not None else f"{'-':>15}"
        print(f"{name:<22} {median}   {status}")
    if "lars_step" in rows:
        if rows["lars_step"].error:
            print(f"{'lars_step':<22} {'-':>15}   {rows['lars_step'].error}")
        else:
            print("lars_step (ms): " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in step_times.items()))

    check = cfg.device == "cuda"
    ratios, ok = {}, all(row.error is None for row in rows.values())
    print(f"\n{'ratio':<38} {'value':>7}   target{'' if check else ' (not checked off a GPU)'}")
    for target in TARGETS:
        if target.numerator not in values or target.denominator not in values:
            ratios[target.name] = {"value": None, "target": target.describe(), "met": None}
            if target.numerator.split(":")[0] in rows or target.denominator.split(":")[0] in rows:
                print(f"{target.name:<38} {'-':>7}   {target.describe()}  unmeasured")
            continue
        value = values[target.numerator] / values[target.denominator]
        met = target.met(value)
        ratios[target.name] = {"value": value, "target": target.describe(), "met": met if check else None}
        ok = ok and (met or not check)
        verdict = ("ok" if met else "MISSED") if check else ""
        print(f"{target.name:<38} {value:7.3f}   {target.describe()}  {verdict}")
    for name, numerator, denominator in INFO_RATIOS:
        if numerator in values and denominator in values:
            ratios[name] = {"value": values[numerator] / values[denominator], "target": None, "met": None}
            print(f"{name:<38} {ratios[name]['value']:7.3f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result = {
        "benchmark": "bench_gpu", "device": cfg.device,
        "where": torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu", "torch": torch.__version__,
        "cuda": torch.version.cuda, "model": cfg.model, "image_size": cfg.image_size, "batch": cfg.batch,
        "precision": cfg.precision, "channels_last": cfg.channels_last, "steps": cfg.steps, "warmup": cfg.warmup,
        "rounds": cfg.rounds, "date": time.strftime("%Y-%m-%d"), "elapsed_s": round(elapsed_s, 1),
        "load_average": load,
        "rows": {name: {"images_per_s": row.images_per_s, "median": row.median, "error": row.error,
                        "detail": row.detail} for name, row in rows.items()},
        "ratios": ratios, "targets_checked": check, "ok": ok,
    }
    print("RESULT " + json.dumps(result))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
