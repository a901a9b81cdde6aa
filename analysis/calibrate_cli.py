"""`larscale bench-comm` and `larscale calibrate`: measure this machine and fit a calibrated profile.

Registered by :func:`analysis.cli.register`. Handlers import mpi4py, numpy-heavy code and the fitting code
inside themselves, so ``larscale --help`` stays cheap.
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
        "mean/median/95%% CI, nccl-tests bus bandwidth. Run it under a launcher (mpirun -np N python -m "
        "larscale bench-comm ...) or give --ranks N to have it start N local ranks itself.",
    )
    add_bench_arguments(bench, operations="allreduce,pingpong,reduce_local")
    bench.set_defaults(handler=run_bench)

    cal = subparsers.add_parser(
        "calibrate",
        help="fit alpha, beta, gamma and compute efficiency to bench-comm CSVs and training runs; write a profile",
        description="Least-squares fit of the model's parameters to this machine's measurements: alpha/beta per "
        "link and gamma from bench-comm CSVs (relative errors; gamma pinned by the reduce_local rows, since "
        "allreduce times only see 2*beta + gamma), and measured images/s plus the sustained fraction and "
        "half-efficiency batch from training run directories (summary.json + steps/). Writes the base profile "
        "with network and compute replaced and the fit, residuals and inputs under 'calibration'.",
    )
    cal.add_argument("--machine", required=True, help="base profile (bundled name or YAML path)")
    cal.add_argument("--bench", nargs="+", default=[], metavar="CSV", help="bench-comm CSV file(s)")
    cal.add_argument("--runs", nargs="+", default=[], metavar="DIR", help="training run directories")
    cal.add_argument("--out", required=True, help="calibrated profile YAML to write")
    cal.add_argument("--name", default=None, help="profile name (default: <base>-calibrated)")
    cal.add_argument("--algorithm", default=None,
                     help="allreduce formula to fit (default: the base profile's network.algorithm)")
    cal.add_argument("--gamma-gbytes-per-s", type=float, default=None,
                     help="fix gamma (bytes reduced per second, GB/s) instead of fitting it")
    cal.add_argument("--fit-min-bytes", default="4", help="smallest message size fitted (default 4)")
    cal.add_argument("--fit-max-bytes", default="1G", help="largest message size fitted (default 1G)")
    cal.add_argument("--with-pingpong", action="store_true",
                     help="also fit the ping-pong rows jointly (default: reported as a diagnostic only)")
    cal.add_argument("--runs-apart", action="store_true",
                     help="fit every run on its own (default: runs of one workload that ran side by side on the same "
                     "host are combined step by step, the slowest per step, as a synchronous step waits for it)")
    cal.add_argument("--warmup-steps", type=int, default=None,
                     help="steps to drop at the start of each run (default: the run's warmup_steps_excluded)")
    cal.add_argument("--strict", action="store_true",
                     help="exit 1 without writing the profile when any run or step-log line had to be skipped "
                     "(default: skip it, list it with file and line, and fit the rest)")
    cal.set_defaults(handler=run_calibrate)


def add_bench_arguments(bench: argparse.ArgumentParser, operations: str) -> None:
    """The options of `larscale bench-comm`, shared by `larscale bench-hvd` (scaling.cli)."""
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
    from analysis.benchcomm import BenchConfig, parse_bytes
    from larscale import UsageError

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
    return argv + (["--out", args.out] if args.out else [])


def run_bench(args: argparse.Namespace, subcommand: str = "bench-comm", factories_of=None) -> int:
    """bench-comm's handler; `larscale bench-hvd` passes its name and ``factories_of(comm)`` (extra operations,
    and the library name for the CSV), called on every rank once MPI is up."""
    from analysis.benchcomm import format_table, launched_by_mpi, run_benchmark, write_csv
    from larscale import UsageError

    config = _bench_config(args)
    if args.ranks is not None and args.ranks < 1:
        raise UsageError(f"--ranks must be at least 1, got {args.ranks}")
    if args.out:  # the CSV is written at the end: an unwritable path must fail now, not after the benchmark
        from scaling.runlog import OutputDirError, check_writable_file

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
        rows = run_benchmark(comm, config, factories, library)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if comm.Get_rank() == 0:
        print(format_table(rows), flush=True)
        if args.out:
            print(f"wrote {write_csv(rows, args.out)}", flush=True)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from analysis.benchcomm import parse_bytes, read_csv
    from analysis.calibrate import (
        calibrated_profile,
        default_operations,
        fit_comm,
        fit_compute,
        format_base_properties,
        format_report,
        horovod_cycle_wait_s,
        pace_side_by_side,
        profile_yaml,
        read_runs,
    )
    from analysis.machine import load_machine
    from larscale import UsageError
    from scaling.runlog import OutputDirError, check_writable_file

    if not args.bench and not args.runs:
        raise UsageError("give --bench CSV(s) and/or --runs DIR(s): nothing to calibrate from")
    try:
        check_writable_file(args.out)
    except OutputDirError as err:
        raise UsageError(f"--out {err}") from None
    skipped = []
    try:
        base = load_machine(args.machine)
        comm = compute = None
        if args.bench:
            rows = [row for path in args.bench for row in read_csv(path)]
            operations = default_operations(rows) + (("pingpong",) if args.with_pingpong else ())
            gamma = None if args.gamma_gbytes_per_s is None else 1.0 / (args.gamma_gbytes_per_s * 1e9)
            comm = fit_comm(rows, algorithm=args.algorithm or base.network.algorithm, gamma_s_per_byte=gamma,
                            default_gamma_s_per_byte=base.network.gamma_s_per_byte, operations=operations,
                            min_bytes=parse_bytes(args.fit_min_bytes), max_bytes=parse_bytes(args.fit_max_bytes),
                            horovod_wait_s=horovod_cycle_wait_s(base.network.cycle_time_ms),
                            horovod_cycle_s=base.network.cycle_time_ms / 1e3)
        if args.runs:
            runs, skipped = read_runs(args.runs, args.warmup_steps)
            if skipped:
                count = {what: sum(1 for p in skipped if p.what == what)
                         for what in ("line skipped", "run skipped", "steps missing")}
                print(f"larscale calibrate: skipped {count['line skipped']} step-log line(s) and "
                      f"{count['run skipped']} run(s) of {len(args.runs)}; {count['steps missing']} step log(s) "
                      "incomplete:", file=sys.stderr)
                for problem in skipped:
                    print(f"  {problem}", file=sys.stderr)
            if args.strict and skipped:
                print("larscale calibrate: --strict: no profile written", file=sys.stderr)
                return 1
            if not runs:
                raise UsageError(f"none of the {len(args.runs)} run(s) given with --runs is usable (see above)")
            paced: list[str] = []
            if not args.runs_apart:
                runs, paced = pace_side_by_side(runs)
            devices = base.node.devices
            cores_per_device = base.node.cores / devices.count if devices.kind == "cpu" else 1.0
            compute = fit_compute(runs, devices.peak_tflops["fp32"] * 1e12, cores_per_device=cores_per_device,
                                  default_half_efficiency_batch=base.compute.half_efficiency_batch, notes=paced)
        data = calibrated_profile(base, comm, compute, name=args.name,
                                  inputs={"bench": list(args.bench), "runs": list(args.runs),
                                          "skipped": [str(p) for p in skipped]})
    except ValueError as err:
        raise UsageError(str(err)) from None
    from pathlib import Path

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_yaml(data))
    print(format_report(comm, compute))
    print(format_base_properties(base))
    print(f"wrote {out} (profile {data['name']!r})")
    return 0
