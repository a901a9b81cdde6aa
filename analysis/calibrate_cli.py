"""`larscale calibrate`: fit a calibrated machine profile to this machine's measurements.

The measurements come from `larscale bench-comm` / `bench-hvd` (scaling.bench_cli: they run under MPI) and from
training run directories. Registered by :func:`analysis.cli.register`; the handler imports the fitting code inside
itself, so ``larscale --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
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
    cal.add_argument("--overlap", choices=("layerwise", "none"), default=None,
                     help="whether allreduces overlap the backward pass (none: a compiled backward hands every "
                     "gradient over at its end); default: what the runs recorded, else the base profile's")
    cal.add_argument("--strict", action="store_true",
                     help="exit 1 without writing the profile when any run or step-log line had to be skipped "
                     "(default: skip it, list it with file and line, and fit the rest)")
    cal.set_defaults(handler=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from analysis.calibrate import (
        calibrated_profile,
        fit_runs_compute,
        format_base_properties,
        format_report,
        overlap_mode,
        profile_yaml,
    )
    from analysis.fit_comm import CommFitOptions, default_operations, fit_comm
    from analysis.runs import read_runs
    from larscale import UsageError
    from larscale.benchformat import parse_bytes, read_csv
    from larscale.machine import load_machine
    from larscale.runformat import OutputDirError, check_writable_file

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
        overlap = None if args.overlap is None else (args.overlap, "given with --overlap")
        jitter = None
        if args.bench:
            rows = [row for path in args.bench for row in read_csv(path)]
            operations = default_operations(rows) + (("pingpong",) if args.with_pingpong else ())
            gamma = None if args.gamma_gbytes_per_s is None else 1.0 / (args.gamma_gbytes_per_s * 1e9)
            options = CommFitOptions.for_profile(
                base, algorithm=args.algorithm or base.network.algorithm, gamma_s_per_byte=gamma,
                operations=operations, min_bytes=parse_bytes(args.fit_min_bytes),
                max_bytes=parse_bytes(args.fit_max_bytes))
            comm = fit_comm(rows, options)
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
            overlap = overlap_mode(runs, base, args.overlap)
            compute = fit_runs_compute(base, runs, runs_apart=args.runs_apart)
            jitter = runs_jitter(args.runs, runs, args.warmup_steps, args.runs_apart)
        data = calibrated_profile(base, comm, compute, name=args.name,
                                  inputs={"bench": list(args.bench), "runs": list(args.runs),
                                          "skipped": [str(p) for p in skipped]}, overlap=overlap, jitter=jitter)
    except ValueError as err:
        raise UsageError(str(err)) from None
    from pathlib import Path

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_yaml(data))
    print(format_report(comm, compute))
    print(format_base_properties(base))
    if overlap is not None:
        print(f"network.overlap: {overlap[0]} ({overlap[1]})")
    print(f"wrote {out} (profile {data['name']!r})")
    return 0


def runs_jitter(run_dirs, runs, warmup_steps: int | None, runs_apart: bool) -> tuple[float, int, str] | None:
    """Step-time jitter from the runs' step logs (analysis/jitter.py) and how many side-by-side runs the fitted
    rates already wait for (the slowest per step of a paced group)."""
    from analysis.jitter import measured_jitter
    from analysis.runs import pace_side_by_side

    found = measured_jitter(run_dirs, warmup_steps)
    if found is None:
        return None
    included = 1 if runs_apart else max((r.side_by_side for r in pace_side_by_side(runs)[0]), default=1)
    return found.cv, included, found.note
