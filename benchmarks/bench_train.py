"""`larscale train` against the loop a user would write, for both backends, and weak scaling 2 ranks vs 1.

Usage (repo root)::

    .venv/bin/python benchmarks/bench_train.py [--models resnet50:8:64,alexnet:8:227] [--steps 25] [--repeats 3]
                                               [--backends horovod,ddp] [--json OUT]

For each model (same per-rank batch, synthetic data, SGD with momentum and weight decay, fp32, contiguous memory
format, 1 thread per rank, 2 ranks) and each backend, two contenders:

* ``bare``: the loop a user would write with nothing else — model, the backend's data parallelism
  (``hvd.DistributedOptimizer`` around SGD under ``mpirun``; ``DistributedDataParallel`` under ``torchrun``), fixed
  random tensors, ``loss.backward(); optimizer.step(); optimizer.zero_grad()``; timed over the steps after warm-up on
  each rank, a step's time being the slowest rank's;
* ``larscale``: ``python -m scaling.train --backend B`` with the same model, batch and data kind, under the same
  launcher; step times from its step logs (same warm-up exclusion, slowest rank per step).

Every repeat runs all contenders one after the other (bare and larscale of each backend, then larscale on 1 rank),
so drifts of a shared machine hit all of them. Two figures per backend: the ratio of the **best repeats**
(the fastest repeat's median step of each contender: what each can do when the machine lets it), and the ratio of
the pooled medians. Target (issue #14/#16): **larscale / bare ≥ 0.97** on both backends. Weak scaling: larscale
(Horovod) at 1 rank vs 2 ranks, same per-rank batch: efficiency = throughput(2 ranks) / (2 · throughput(1 rank)).
Also printed: larscale's own bookkeeping per step (``step_s`` minus the four phases), which a bare loop does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.97  # larscale train images/s ÷ bare loop images/s
LAUNCHER = {"horovod": "mpi", "ddp": "torchrun"}
sys.path.insert(0, str(REPO))

from larscale.runformat import read_steps, step_log_path  # noqa: E402
from scaling.launch import local_env, rank_command  # noqa: E402

BARE = r'''
import json, os, sys, time
import torch
import models
backend, name = sys.argv[1], sys.argv[2]
batch, image, steps, warmup = (int(a) for a in sys.argv[3:7])
out_prefix = sys.argv[7]
torch.set_num_threads(1)
torch.manual_seed(0)
model = models.get(name, framework="torch", num_classes=1000, image_size=image)
sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
if backend == "horovod":
    import horovod.torch as hvd
    hvd.init()
    rank = hvd.rank()
    opt = hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
else:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(model)
    opt = sgd
x = torch.randn(batch, 3, image, image)
y = torch.randint(0, 1000, (batch,))
loss_fn = torch.nn.CrossEntropyLoss()
times = []
for step in range(steps):
    t = time.perf_counter()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t)
with open(f"{out_prefix}-{rank}.json", "w") as handle:  # a file per rank: ranks' stdout lines can interleave
    json.dump(times[warmup:], handle)
'''


def run(argv: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, env=local_env(threads_per_rank=1), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:8])}... exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def bare(backend: str, model: str, batch: int, image: int, steps: int, warmup: int) -> list[float]:
    """The bare loop's per-step times (slowest rank) after warm-up."""
    prefix = Path(tempfile.mkdtemp(prefix="larscale-bare-")) / "times"
    program = [sys.executable, "-c", BARE, backend, model, str(batch), str(image), str(steps), str(warmup),
               str(prefix)]
    if backend == "ddp":  # torchrun runs a script, not -c: write the loop to a file beside the run
        script = Path(tempfile.gettempdir()) / f"larscale-bare-ddp-{os.getpid()}.py"
        script.write_text(BARE)
        program = [sys.executable, str(script), *program[3:]]
    run(rank_command(2, program, controller=LAUNCHER[backend]))
    per_rank = [json.loads(Path(f"{prefix}-{rank}.json").read_text()) for rank in range(2)]
    shutil.rmtree(prefix.parent, ignore_errors=True)
    return [max(ts) for ts in zip(*per_rank, strict=True)]


BOOKKEEPING: list[float] = []  # larscale's own per-step time outside the phases a bare loop also has


def step_times(out: Path, ranks: int, warmup: int) -> list[float]:
    """larscale's per-step times (slowest rank) after warm-up, from the step logs; notes its bookkeeping share."""
    per_rank = []
    for rank in range(ranks):
        records = read_steps(step_log_path(out, rank))[warmup:]
        per_rank.append([r["step_s"] for r in records])
        BOOKKEEPING.extend((r["step_s"] - r["data_s"] - r["compute_s"] - r["allreduce_s"] - r["optimizer_s"])
                           / r["step_s"] for r in records)
    return [max(ts) for ts in zip(*per_rank, strict=True)]


def larscale(backend: str, ranks: int, model: str, batch: int, image: int, steps: int, warmup: int,
             out: Path) -> list[float]:
    run(rank_command(ranks, [sys.executable, "-m", "scaling.train", "--backend", backend, "--model", model,
                             "--dataset", "synthetic", "--image-size", str(image), "--batch-per-rank", str(batch),
                             "--steps", str(steps), "--optimizer", "sgd", "--lr", "0.01", "--threads", "1",
                             "--memory-format", "contiguous", "--measure-warmup-steps", str(warmup),
                             "--log-every", "1000", "--no-eval", "--out", str(out)],
                     controller=LAUNCHER[backend]))
    return step_times(out, ranks, warmup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50:8:64,alexnet:8:227",
                        help="comma list of model:batch_per_rank:image_size")
    parser.add_argument("--backends", default="horovod,ddp")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models.split(","):
            model, batch, image = spec.split(":")
            batch, image = int(batch), int(image)
            # contender -> one list of per-step times per repeat
            times: dict[str, list[list[float]]] = {}
            for repeat in range(args.repeats):
                for backend in backends:
                    times.setdefault(f"bare-{backend}", []).append(
                        bare(backend, model, batch, image, args.steps, args.warmup))
                    times.setdefault(f"larscale-{backend}", []).append(larscale(
                        backend, 2, model, batch, image, args.steps, args.warmup,
                        Path(tmp) / f"{model}-{backend}-{repeat}"))
                times.setdefault("larscale-1rank", []).append(larscale(
                    backends[0], 1, model, batch, image, args.steps, args.warmup, Path(tmp) / f"{model}-1-{repeat}"))
                print(f"{model} repeat {repeat}: median step " + ", ".join(
                    f"{name} {statistics.median(reps[-1]) * 1e3:.0f} ms" for name, reps in times.items()), flush=True)
            row: dict = {"model": model, "batch_per_rank": batch, "image_size": image, "ranks": 2,
                         "threads_per_rank": 1, "repeats": args.repeats}
            for name, reps in times.items():
                images = batch * (1 if name == "larscale-1rank" else 2)
                row[name] = {"best_images_per_s": max(images / statistics.median(r) for r in reps),
                             "pooled_median_images_per_s": images / statistics.median([t for r in reps for t in r])}
            for backend in backends:
                ours, theirs = row[f"larscale-{backend}"], row[f"bare-{backend}"]
                row[f"ratio_{backend}"] = ours["best_images_per_s"] / theirs["best_images_per_s"]
                row[f"ratio_{backend}_pooled"] = ours["pooled_median_images_per_s"] / \
                    theirs["pooled_median_images_per_s"]
            two = row[f"larscale-{backends[0]}"]["best_images_per_s"]
            row["weak_scaling_efficiency"] = two / (2 * row["larscale-1rank"]["best_images_per_s"])
            row["larscale_bookkeeping_fraction_median"] = statistics.median(BOOKKEEPING)
            BOOKKEEPING.clear()
            results.append(row)
            print(f"{model}: " + "; ".join(
                f"larscale/bare {b} = {row[f'ratio_{b}']:.3f} best, {row[f'ratio_{b}_pooled']:.3f} pooled"
                for b in backends) + f" (target >= {TARGET}); weak-scaling efficiency "
                f"{row['weak_scaling_efficiency']:.3f}; bookkeeping "
                f"{row['larscale_bookkeeping_fraction_median'] * 100:.3f} % of a step", flush=True)
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": [load_before, os.getloadavg()[0]],
              "target_ratio": TARGET, "results": results,
              "passed": all(r[f"ratio_{b}"] >= TARGET for r in results for b in backends)}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print("RESULT " + json.dumps(report), flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
