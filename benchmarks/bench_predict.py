"""Benchmark: configurations predicted per second by the vectorised model on a one-million-point grid.

The grid is ``nodes × per-rank batch`` (1000 × 1000 by default): every point is a full prediction
(compute, bucketed allreduce overlapped with the backward pass, the wait for the slowest rank, data, epoch,
time-to-train, efficiency, and the prediction interval of each). Target: ≥ 1e6 configurations per second.
Printed beside it, measured in the same run on a sample: the same model called one configuration at a time
(``predict_point``), and the plain reference model (``analysis.predict_plain``, loops and scalars, which the
tests hold equal to the vectorised one), so the ratios show what vectorising buys.

    .venv/bin/python benchmarks/bench_predict.py [--model resnet50] [--machine stampede2-knl] [--side 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.params import PerfParams  # noqa: E402
from analysis.predict import predict, predict_from, predict_point  # noqa: E402
from analysis.predict_plain import predict_plain  # noqa: E402
from analysis.workload import load_workload  # noqa: E402
from larscale.machine import load_machine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--machine", default="stampede2-knl")
    parser.add_argument("--side", type=int, default=1000, help="grid is side x side (default 1000: 1e6 points)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scalar-sample", type=int, default=300, help="configurations timed one at a time")
    parser.add_argument("--target", type=float, default=1e6, help="configurations/s to reach (default 1e6)")
    args = parser.parse_args(argv)

    machine = load_machine(args.machine)
    params = PerfParams.from_machine(machine)
    workload = load_workload(args.model)
    rpn = machine.default_ranks_per_node
    nodes = np.arange(1, args.side + 1)[:, None] % machine.limits.max_nodes + 1     # stay within the machine
    per_rank = np.arange(1, args.side + 1)[None, :]
    global_batch = nodes * rpn * per_rank
    points = int(nodes.size * per_rank.size)

    predict_from(workload, params, nodes, global_batch, 90.0)      # warm-up (page in, caches)
    model_only, cpu_only = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = predict_from(workload, params, nodes, global_batch, 90.0)
        model_only.append(time.perf_counter() - start)
        cpu_only.append(time.process_time() - cpu_start)
    assert result.size == points and np.all(np.isfinite(result.iteration_s))
    assert np.all(result.iteration_s_low <= result.iteration_s)
    assert np.all(result.iteration_s <= result.iteration_s_high)
    start = time.perf_counter()
    predict(args.model, args.machine, nodes, global_batch, 90.0)   # end to end: profile + tables + model
    end_to_end = time.perf_counter() - start

    rng = np.random.default_rng(0)
    sample = rng.choice(points, min(args.scalar_sample, points), replace=False)
    flat_nodes = np.broadcast_to(nodes, global_batch.shape).reshape(-1)
    flat_batch = global_batch.reshape(-1)
    start = time.perf_counter()
    for i in sample:
        predict_point(workload, machine, int(flat_nodes[i]), int(flat_batch[i]), 90.0)
    scalar_rate = sample.size / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in sample:
        predict_plain(workload, params, int(flat_nodes[i]), int(flat_batch[i]), 90.0)
    plain_rate = sample.size / (time.perf_counter() - start)

    best, median = min(model_only), statistics.median(model_only)
    report = {
        "benchmark": "bench_predict", "model": args.model, "machine": args.machine, "points": points,
        "gradient_events": workload.events, "seconds_best": best, "seconds_median": median,
        "cpu_seconds_best": min(cpu_only), "configs_per_cpu_s": points / min(cpu_only),
        "configs_per_s_best": points / best, "configs_per_s_median": points / median,
        "end_to_end_seconds": end_to_end, "scalar_configs_per_s": scalar_rate,
        "vectorised_over_scalar": (points / median) / scalar_rate, "plain_configs_per_s": plain_rate,
        "vectorised_over_plain": (points / median) / plain_rate, "target_configs_per_s": args.target,
        "meets_target": points / median >= args.target,
    }
    print(f"{points:,} configurations of {args.model} on {args.machine} ({workload.events} gradient events)")
    print(f"  vectorised model: best {best:.3f} s, median {median:.3f} s → {points / median:,.0f} configurations/s "
          f"(target {args.target:,.0f}/s: {'met' if report['meets_target'] else 'NOT met'})")
    print(f"  CPU time of this process, best {min(cpu_only):.3f} s → {points / min(cpu_only):,.0f} configurations per "
          "CPU-second (what other processes on a loaded machine do not change)")
    print(f"  end to end incl. loading profile and tables: {end_to_end:.3f} s")
    print(f"  one at a time (predict_point): {scalar_rate:,.0f} configurations/s → vectorised is "
          f"{report['vectorised_over_scalar']:,.0f}x faster")
    print(f"  plain reference (predict_plain): {plain_rate:,.0f} configurations/s → vectorised is "
          f"{report['vectorised_over_plain']:,.0f}x faster")
    print("RESULT " + json.dumps(report))
    return 0 if report["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
