"""`larscale bench-comm` and `larscale bench-hvd`: time allreduces under MPI, CSV for `larscale calibrate`.

Both run on every rank (under a launcher, or started here with ``--ranks N``) and share one harness
(:mod:`scaling.benchcomm`) and one CSV format (:mod:`larscale.benchformat`). Handlers import mpi4py, torch and
Horovod inside themselves, so ``larscale --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench-comm",
        help="OSU-style MPI allreduce benchmark over message sizes (CSV for `larscale calibrate`)",
        description="Time MPI allreduce (plus a ping-pong and a local numpy add, which make the alpha-beta-gamma "
        "terms separable) over message sizes: warm-up, barrier-synchronised repetitions, max over ranks, "
        "mean/median/95% CI, nccl-tests bus bandwidth. Run it under a launcher (mpirun -np N python -m "
        "larscale bench-comm ...) or give --ranks N to have it start N local ranks itself.",
    )
    add_bench_arguments(bench, operations="allreduce,pingpong,reduce_local")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="where the buffers live: cuda hands GPU memory (torch tensors, each rank on the GPU of "
                       "its local rank) to a CUDA-aware MPI, and adds on the GPU; refused when the MPI library does "
                       "not say it is CUDA-aware (bench-hvd --device cuda times NCCL instead)")
    bench.set_defaults(handler=run_bench_comm)

    bench = subparsers.add_parser(
        "bench-hvd",
        help="time Horovod's own allreduce (the training path) over message sizes, CSV for `larscale calibrate`",
        description="bench-comm's harness (warm-up, barrier-synchronised repetitions, max over ranks, median/95% "
        "CI, CSV) on hvd.allreduce_(op=Average) of float32 tensors, with Horovod initialised as in training "
        "(set HOROVOD_FUSION_THRESHOLD and HOROVOD_CYCLE_TIME as the training runs do); by default also the "
        "MPI reduce_local and pingpong rows. Run under a launcher or give --ranks N.",
    )
    add_bench_arguments(bench, operations="horovod_allreduce,horovod_allreduce_fused,reduce_local,pingpong")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="where Horovod's tensors live: cuda times the allreduce over device memory (NCCL, "
                       "RCCL under ROCm), each rank on the GPU of its local rank; the MPI rows stay on the host")
    bench.set_defaults(handler=run_bench_hvd)


def add_bench_arguments(bench: argparse.ArgumentParser, operations: str) -> None:
    """The options of `larscale bench-comm`, shared by `larscale bench-hvd`."""
    bench.add_argument("-np", "--ranks", type=int, default=None,
                       help="start this many local ranks with mpirun when not already under a launcher")
    bench.add_argument("--min-bytes", default="4", help="smallest message (default 4; suffixes K, M, G)")
    bench.add_argument("--max-bytes", default="64M", help="largest message (default 64M)")
    bench.add_argument("--factor", type=int, default=2, help="size growth factor (default 2)")
    bench.add_argument("--warmup", type=int, default=5, help="untimed calls per size (default 5)")
    bench.add_argument("--repetitions", type=int, default=20, help="timed repetitions per size (default 20)")
    bench.add_argument("--min-rep-ms", type=float, default=1.0,
                       help="batch small messages so a timed repetition lasts at least this (default 1 ms)")
    bench.add_argument("--max-seconds-per-size", type=float, default=10.0,
                       help="time budget per size; fewer repetitions (>= 3) when a size is slow (default 10)")
    bench.add_argument("--operations", default=operations,
                       help=f"comma-separated operations (default {operations}); bench-comm runs allreduce, "
                       "pingpong, reduce_local; bench-hvd adds horovod_allreduce, horovod_allreduce_fused")
    bench.add_argument("--label", default="", help="free text copied into every CSV row (e.g. the network)")
    bench.add_argument("--out", default=None, help="CSV file to write (rank 0); default: print only")
    bench.add_argument("--launcher-args", default="",
                       help="extra mpirun arguments when --ranks starts the ranks, e.g. '--mca btl tcp,self'")
    bench.add_argument("--timeout", type=float, default=1800.0, help="seconds before started ranks are killed")


def _bench_config(args: argparse.Namespace):
    from larscale import UsageError
    from larscale.benchformat import parse_bytes
    from scaling.benchcomm import BenchConfig

    try:
        return BenchConfig(
            min_bytes=parse_bytes(args.min_bytes), max_bytes=parse_bytes(args.max_bytes), factor=args.factor,
            warmup=args.warmup, repetitions=args.repetitions, min_rep_s=args.min_rep_ms / 1e3,
            max_seconds_per_size=args.max_seconds_per_size,
            operations=tuple(op.strip() for op in args.operations.split(",") if op.strip()), label=args.label)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The options this run was given, for the ranks it starts (everything but the launch options)."""
    argv = ["--min-bytes", args.min_bytes, "--max-bytes", args.max_bytes, "--factor", str(args.factor),
            "--warmup", str(args.warmup), "--repetitions", str(args.repetitions),
            "--min-rep-ms", str(args.min_rep_ms), "--max-seconds-per-size", str(args.max_seconds_per_size),
            "--operations", args.operations, "--label", args.label]
    argv += ["--device", args.device] if getattr(args, "device", "cpu") != "cpu" else []
    return argv + (["--out", args.out] if args.out else [])


def run_bench(args: argparse.Namespace, subcommand: str = "bench-comm", factories_of=None) -> int:
    """bench-comm's handler; `larscale bench-hvd` passes its name and ``factories_of(comm)`` (extra operations,
    and the library name for the CSV), called on every rank once MPI is up."""
    from larscale import UsageError
    from larscale.benchformat import format_table, write_csv
    from scaling.benchcomm import launched_by_mpi, run_benchmark

    config = _bench_config(args)
    if args.ranks is not None and args.ranks < 1:
        raise UsageError(f"--ranks must be at least 1, got {args.ranks}")
    if args.out:  # the CSV is written at the end: an unwritable path must fail now, not after the benchmark
        from larscale.runformat import OutputDirError, check_writable_file

        try:
            check_writable_file(args.out)
        except OutputDirError as err:
            raise UsageError(f"--out {err}") from None
    if args.ranks is not None and args.ranks > 1 and not launched_by_mpi():
        from scaling.launch import local_env, rank_command

        program = [sys.executable, "-m", "larscale", subcommand, *_forwarded(args)]
        argv = rank_command(args.ranks, program, extra_launcher_args=shlex.split(args.launcher_args))
        print(f"launching: {shlex.join(argv)}", flush=True)
        try:
            return subprocess.run(argv, env=local_env(threads_per_rank=1), timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            print(f"{subcommand} did not finish within {args.timeout:.0f} s", file=sys.stderr)
            return 1
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if args.ranks is not None and args.ranks != comm.Get_size():
        raise UsageError(f"--ranks {args.ranks} but the launcher started {comm.Get_size()} rank(s)")
    factories, library = factories_of(comm) if factories_of is not None else ({}, None)
    try:
        rows = run_benchmark(comm, config, factories, library, device=getattr(args, "device", "cpu"))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if comm.Get_rank() == 0:
        print(format_table(rows), flush=True)
        if args.out:
            print(f"wrote {write_csv(rows, args.out)}", flush=True)
    return 0


def _check_gpu(device: str) -> None:
    """Before any rank starts: one line when ``device`` is cuda and this machine's PyTorch has no GPU (or no torch)."""
    if device == "cpu":
        return
    from larscale import UsageError

    try:
        import torch  # noqa: F401  (device buffers are torch tensors)
    except ImportError:
        raise UsageError(f"--device {device} needs PyTorch with GPU support (its tensors are the device buffers); "
                         "this Python has no torch") from None
    from scaling.hvdcomm import check_device

    check_device(device)


def run_bench_comm(args: argparse.Namespace) -> int:
    import functools

    from scaling.benchcomm import device_factories

    _check_gpu(args.device)
    factories_of = functools.partial(device_factories, device=args.device) if args.device != "cpu" else None
    return run_bench(args, factories_of=factories_of)


def run_bench_hvd(args: argparse.Namespace) -> int:
    import functools

    from scaling.hvdcomm import horovod_factories

    _check_gpu(args.device)
    return run_bench(args, subcommand="bench-hvd",
                     factories_of=functools.partial(horovod_factories, device=args.device))
