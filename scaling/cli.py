"""Subcommands of `larscale` that scaling owns (see larscale/__init__.py for the contract)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands. Handlers import heavy modules inside themselves."""
    smoke = subparsers.add_parser(
        "smoke",
        help="real multi-rank Horovod check: allreduce/broadcast in PyTorch and TensorFlow",
        description="Start N local ranks (mpirun for the MPI controller, horovodrun --gloo for Gloo), "
        "allreduce rank-dependent tensors and broadcast from rank 0 in both frameworks, and report "
        "ranks, framework and controller.",
    )
    smoke.add_argument("-np", "--ranks", type=int, default=2, help="number of local ranks (default 2)")
    smoke.add_argument("--controller", choices=("mpi", "gloo"), default="mpi")
    smoke.add_argument("--frameworks", default="torch,tensorflow")
    smoke.add_argument("--timeout", type=float, default=300.0, help="seconds before the ranks are killed")
    smoke.set_defaults(handler=run_smoke, needs=("torch", "horovod"))   # checked before any rank starts

    from scaling import bench_cli  # stdlib-only at import

    bench_cli.register(subparsers)

    from scaling.config import add_arguments  # stdlib-only module: torch/TF/Horovod load in the handler

    train = subparsers.add_parser(
        "train",
        help="data-parallel training (Horovod or DDP; PyTorch or TensorFlow), measured step by step",
        description="Run on every rank (mpirun/srun/horovodrun/torchrun, or alone as 1 rank). Writes DIR/steps/"
        "rank-NNNNN.jsonl, DIR/summary.json and DIR/checkpoints/ (schema: larscale/RUN_FORMAT.md). "
        "Exit 0 when complete, 75 when stopped by SIGTERM/SIGUSR1 after a checkpoint (resume with --resume).",
    )
    add_arguments(train)
    train.set_defaults(handler=run_train)


def run_smoke(args: argparse.Namespace) -> int:
    from larscale import UsageError
    from scaling.launch import local_env, rank_command

    if args.ranks < 1:
        raise UsageError(f"--ranks must be at least 1, got {args.ranks}")
    argv = rank_command(args.ranks, [sys.executable, "-m", "scaling.smoke", "--frameworks", args.frameworks],
                        controller=args.controller)
    print(f"launching: {' '.join(argv)}", flush=True)
    try:
        proc = subprocess.run(argv, env=local_env(threads_per_rank=1), capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"smoke run did not finish within {args.timeout:.0f} s", file=sys.stderr)
        return 1
    results = [json.loads(line.split("SMOKE ", 1)[1]) for line in proc.stdout.splitlines() if "SMOKE {" in line]
    print(f"{'rank':>4} {'size':>4} {'framework':<10} {'controller':<10} {'host':<16} sum  mean  bcast")
    for r in sorted(results, key=lambda r: (r["framework"], r["rank"])):
        marks = ["ok" if r[k] else "FAIL" for k in ("sum_ok", "mean_ok", "broadcast_ok")]
        print(f"{r['rank']:>4} {r['size']:>4} {r['framework']:<10} {r['controller']:<10} "
              f"{r['host'][:16]:<16} {marks[0]:<4} {marks[1]:<5} {marks[2]}")
    expected = args.ranks * len([f for f in args.frameworks.split(",") if f.strip()])
    good = proc.returncode == 0 and len(results) == expected and all(
        r["sum_ok"] and r["mean_ok"] and r["broadcast_ok"] for r in results)
    if not good:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        print(f"smoke run FAILED (exit {proc.returncode}, {len(results)}/{expected} rank reports)",
              file=sys.stderr)
        return 1
    print(f"smoke run passed: {args.ranks} ranks, controller {args.controller}, "
          f"frameworks {args.frameworks}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from larscale import UsageError
    from larscale.runformat import EXIT_USAGE
    from scaling.train import report_usage_error, run

    try:
        return run(args)
    except UsageError as err:  # printed once per job, not once per rank
        report_usage_error("larscale train", err)
        return EXIT_USAGE
