"""`larscale report SWEEP_DIR... --out DIR`: a user's own scaling study, from collected sweeps to an allocation request.

Registered by :func:`analysis.cli.register`; the handler imports the analysis inside itself so that
``larscale --help`` stays cheap. The study is :mod:`analysis.scaling_study`, the page :mod:`analysis.study_report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    rep = subparsers.add_parser(
        "report", help="scaling tables and plots, the profile calibrated from the sweeps, a projection and the "
        "allocation request, from sweep directories",
        description="Read one or several sweep directories of one model (e.g. its strong and its weak sweep; any "
        "scheduler), list every point (measured, or why not), plot strong/weak scaling, speed-up and the "
        "per-phase breakdown, calibrate the machine profile on the smaller points and predict the larger ones "
        "out of sample, project to --to-nodes with an interval, and size the allocation for --epochs or --top1 "
        "(node-hours, device-hours, charge, walltime chain). Writes OUT/index.md, OUT/index.html (self-"
        "contained), plots (PNG + SVG), every table as CSV and Parquet, profile.yaml and summary.json. The "
        "sweep directories are only read.")
    rep.add_argument("sweeps", nargs="+", metavar="SWEEP_DIR", help="sweep directories (larscale sweep submit's)")
    rep.add_argument("--out", required=True, help="report directory to write (not inside a sweep directory)")
    rep.add_argument("--machine", default=None,
                     help="base profile (bundled name or YAML path; default: the one the sweeps were planned on)")
    rep.add_argument("--bench", nargs="+", default=[], metavar="CSV",
                     help="bench-comm / bench-hvd CSVs of the same machine, fitted with the runs")
    rep.add_argument("--fit-max-ranks", type=int, default=None,
                     help="fit on the points of at most this many ranks (default: the lower half of the rank "
                     "counts); the others are predicted out of sample")
    rep.add_argument("--to-nodes", type=int, default=None, help="projection scale (default: the profile's max_nodes)")
    rep.add_argument("--ranks-per-node", type=int, default=None,
                     help="ranks per node at the projection (default: the sweeps' largest)")
    goal = rep.add_mutually_exclusive_group()
    goal.add_argument("--epochs", type=float, default=None, help="allocation for this many epochs (default 90)")
    goal.add_argument("--top1", type=float, default=None,
                      help="allocation to reach this top-1 (%%; models with seed accuracy tables)")
    rep.add_argument("--restart-overhead-s", type=float, default=120.0,
                     help="seconds each job of a walltime chain loses to restarting (default 120)")
    rep.add_argument("--configurations", type=int, default=5, help="allocation configurations to list (default 5)")
    rep.set_defaults(handler=run_report)


def base_profile(machine: str | None, sweeps):
    """--machine, checked against the machine the sweeps ran on; else the profile the sweeps were planned on."""
    from analysis.sweepdirs import ReportError, check_profile_matches
    from larscale.machine import load_machine, parse_machine

    if machine is not None:
        profile = load_machine(machine)
        check_profile_matches(profile, sweeps)
        return profile
    recorded = sweeps[0].machine
    try:
        return parse_machine(recorded, source=f"{sweeps[0].path}/manifest.json machine")
    except ValueError:
        name = recorded.get("name")
        if not name:
            raise ReportError(f"{sweeps[0].path}: the manifest records no machine profile; give --machine") from None
        return load_machine(name)


def check_out(out: Path, sweeps) -> None:
    from analysis.sweepdirs import ReportError

    resolved = out.resolve()
    for sweep in sweeps:
        root = sweep.path.resolve()
        if resolved == root or root in resolved.parents:
            raise ReportError(f"--out {out} is inside sweep directory {sweep.path}: a report never writes into a "
                              "sweep")
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a directory")


def command_line(args: argparse.Namespace) -> str:
    """The command as given (for the page's "how this was made")."""
    import shlex

    words = ["larscale", "report", *args.sweeps, "--out", args.out]
    for name in ("machine", "fit_max_ranks", "to_nodes", "ranks_per_node", "epochs", "top1"):
        value = getattr(args, name)
        if value is not None:
            words += [f"--{name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    if args.bench:
        words += ["--bench", *args.bench]
    return shlex.join(words)


def run_report(args: argparse.Namespace) -> int:
    from analysis.scaling_study import StudyOptions
    from analysis.study_report import write_study
    from analysis.sweepdirs import read_sweeps
    from larscale import UsageError

    for name in ("fit_max_ranks", "to_nodes", "ranks_per_node", "configurations"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("epochs", "top1"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name} must be > 0, got {value}")
    for path in args.bench:
        if not Path(path).is_file():
            raise UsageError(f"--bench {path}: no such file")
    try:
        sweeps = read_sweeps(args.sweeps)
        base = base_profile(args.machine, sweeps)
        out = Path(args.out)
        check_out(out, sweeps)
        options = StudyOptions(bench=tuple(args.bench), fit_max_ranks=args.fit_max_ranks, to_nodes=args.to_nodes,
                               ranks_per_node=args.ranks_per_node, epochs=args.epochs, top1=args.top1,
                               restart_overhead_s=args.restart_overhead_s, configurations=args.configurations)
        study = write_study(sweeps, base, options, out, command=command_line(args))
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"report: {study.index} (and index.html, summary.json, {len(study.figures)} figures)")
    return 0
