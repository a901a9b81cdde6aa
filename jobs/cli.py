"""Subcommands of `larscale` that jobs owns (see larscale/__init__.py for the contract).

``larscale sweep plan|submit|status|collect``: plan prints the points and their cost, submit writes the
manifest and scripts and submits, status asks the scheduler, collect gathers the runs into one table.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands. Handlers import heavy modules inside themselves."""
    demo = subparsers.add_parser(
        "demo", help="the main job: a real scaling study on this machine, calibrated, explained in a report",
        description="Plan and run a weak- and a strong-scaling sweep (1 and 2 ranks, ResNet-50 and AlexNet, "
        "synthetic data) as real Horovod jobs, calibrate the local profile (bench-comm + 1-rank runs) and "
        "predict every point, reproduce the seed papers' headline times, answer a planning question on "
        "Stampede2 KNL, and write a report directory (index.md, plots, CSV/Parquet). Finished points are "
        "reused unless --fresh.")
    demo.add_argument("--out", default="report", help="report directory (default: ./report)")
    demo.add_argument("--quick", action="store_true", help="smaller study (ResNet-50 at 64 px, 8 steps)")
    demo.add_argument("--fresh", action="store_true",
                      help="start over: the previous output is moved to OUT.old-<time>, not deleted")
    demo.add_argument("--scheduler", choices=("local", "slurm"), default="local",
                      help="run the points directly (local) or through a reachable Slurm")
    demo.add_argument("--figures", default=None, metavar="DIR",
                      help="also copy the main figures here (the README's: docs/figures)")
    demo.set_defaults(handler=run_demo, needs=("torch", "horovod", "mpi4py"))   # checked before any point runs
    sweep = subparsers.add_parser(
        "sweep", help="sweep node counts x batch sizes as scheduler jobs: plan, submit, status, collect",
        description="Turn a sweep spec (YAML) into batch scripts for the machine's scheduler, print what it "
        "will cost, submit, track and collect every run into one table.")
    actions = sweep.add_subparsers(dest="action", metavar="ACTION", required=True)

    def spec_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", help="sweep spec YAML")
        p.add_argument("--machine", help="machine profile name or YAML path (default: the spec's)")
        p.add_argument("--output", help="sweep directory (default: the spec's output, else runs/<name>)")

    plan = actions.add_parser("plan", help="print the points, walltimes and total node-hours",
                              description="Validate the spec and print every point with its walltime and cost; "
                              "points over the queue limits are listed with the reason (exit 2).")
    spec_args(plan)
    plan.add_argument("--show-script", action="store_true", help="also print the first job's script")
    plan.add_argument("--format", choices=("text", "json"), default="text",
                      help="json: one object with every point (its walltime, cost, refusal) for scripts")
    plan.set_defaults(handler=run_plan)

    submit = actions.add_parser("submit", help="write scripts + manifest and submit",
                                description="Write one script per job and the manifest into the sweep directory, "
                                "then submit; complete points are never rerun, interrupted ones resume.")
    spec_args(submit)
    from jobs.schedulers import scheduler_names

    submit.add_argument("--scheduler", choices=scheduler_names(),
                        help="override the profile's scheduler (local: run here, one after another)")
    submit.add_argument("--points", help="comma-separated point ids (default: all)")
    submit.add_argument("--skip-refused", action="store_true", help="submit the others when some are refused")
    submit.add_argument("--dry-run", action="store_true", help="write scripts and manifest, do not submit")
    submit.add_argument("--wait", action="store_true", help="wait until no point is queued or running")
    submit.add_argument("--timeout", type=float, default=None, help="seconds to wait (each local job / --wait)")
    submit.set_defaults(handler=run_submit)

    status = actions.add_parser("status", help="ask the scheduler how the sweep's points are",
                                description="Refresh every point's state from the scheduler and the run files.")
    status.add_argument("output", help="sweep directory")
    status.add_argument("--format", choices=("text", "json"), default="text",
                        help="json: one object with every point's state, job, attempts and reason")
    status.set_defaults(handler=run_status)

    bench = subparsers.add_parser(
        "bench-import", help="turn nccl-tests all_reduce_perf or OSU osu_allreduce output into the benchmark CSV",
        description="Read the log of NVIDIA nccl-tests' all_reduce_perf (or rccl-tests') or of the OSU "
        "Micro-Benchmarks' osu_allreduce and write the allreduce rows of the benchmark CSV that "
        "`larscale calibrate --bench` reads.")
    bench.add_argument("log", help="the tool's output, as printed")
    bench.add_argument("--tool", choices=("nccl-tests", "osu"), required=True)
    bench.add_argument("--ranks", type=int, help="ranks of the run (OSU: required; nccl-tests: from its Rank lines)")
    bench.add_argument("--nodes", type=int, help="nodes of the run (nccl-tests: from its Rank lines, else 1)")
    bench.add_argument("--library", default=None, help="what moved the bytes (default: nccl / mpi)")
    bench.add_argument("--out", required=True, help="benchmark CSV to write")
    bench.set_defaults(handler=run_bench_import)

    collect = actions.add_parser("collect", help="gather every run into results.csv and results.parquet",
                                 description="Read every run's summary and step logs into one table; list failed, "
                                 "missing and malformed runs with the reason.")
    collect.add_argument("output", help="sweep directory")
    collect.add_argument("--strict", action="store_true", help="exit 1 when any run failed, is missing or "
                         "has malformed logs")
    collect.set_defaults(handler=run_collect)


def _plan(args: argparse.Namespace):
    from jobs.sweep import plan
    from larscale import UsageError

    try:
        return plan(args.spec, machine=args.machine, output_dir=args.output)
    except ValueError as err:
        raise UsageError(str(err)) from None


def run_plan(args: argparse.Namespace) -> int:
    from jobs.scripts import check_launch, render
    from jobs.sweep import describe, job_groups
    from larscale import UsageError

    the_plan = _plan(args)
    try:  # a launcher that cannot start these ranks is the spec's mistake, found before anything is written
        check_launch(the_plan)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.format == "json":
        from jobs.sweep import plan_summary

        print(json.dumps(plan_summary(the_plan), indent=2))
        if the_plan.points and not the_plan.accepted:
            print(f"larscale sweep plan: every point is refused ({the_plan.refused[0].refused}, ...)", file=sys.stderr)
            return 2
        return 0
    print(describe(the_plan))
    if args.show_script:
        groups = job_groups(the_plan)
        if groups:
            print(f"\n--- script of job {groups[0].job_name} ---")
            print(render(the_plan, groups[0]), end="")
    if the_plan.refused:
        why = "; ".join(f"{p.point_id}: {p.refused}" for p in the_plan.refused)
        planned = len(the_plan.points) - len(the_plan.refused)
        if planned == 0:  # nothing left to plan: the spec is the mistake
            raise UsageError(f"every point is refused: {why}")
        # The rest is a plan: say what was left out and how to submit without it (exit 0, scripts can go on).
        print(f"\n{len(the_plan.refused)} point(s) refused, {planned} planned; `larscale sweep submit "
              f"--skip-refused` submits the planned ones", file=sys.stderr)
    return 0


def progress_printer(display=None):
    """The progress callback of `sweep submit`: state changes as lines, a training point's step, images/s and
    ETA as one updating line on a terminal (plain lines every 30 s otherwise)."""
    from jobs.progress import ProgressDisplay, describe_progress

    display = display or ProgressDisplay()

    def show(event) -> None:
        if event.state == "training" and event.run is not None:
            display.update(event.point_id, f"[{event.done + event.failed}/{event.total}] {event.point_id}: "
                           f"{describe_progress(event.run, event.attempt)}")
        elif event.state != "poll":
            display.say(f"[{event.done + event.failed}/{event.total}] {event.point_id} {event.state} "
                        f"(done {event.done}, running {event.running}, failed {event.failed})")
    show.display = display  # type: ignore[attr-defined]
    return show


def run_submit(args: argparse.Namespace) -> int:
    from jobs.submit import SubmitError, submit, wait
    from jobs.sweep import describe
    from larscale import UsageError

    the_plan = _plan(args)
    from larscale.runformat import OutputDirError, check_writable_dir

    try:  # scripts, manifest and every run live there: refuse an unwritable directory before submitting
        check_writable_dir(the_plan.output_dir)
    except OutputDirError as err:
        raise UsageError(f"--output {err}") from None
    print(describe(the_plan))
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout must be a number of seconds > 0, got {args.timeout:g}")
    points = [p.strip() for p in args.points.split(",") if p.strip()] if args.points else None
    show = progress_printer()
    try:
        manifest = submit(the_plan, scheduler=args.scheduler, points=points, progress=show,
                          skip_refused=args.skip_refused, dry_run=args.dry_run, timeout=args.timeout)
        if args.wait and not args.dry_run:
            manifest = wait(manifest.output_dir, timeout=args.timeout or 86400, progress=show)
    except SubmitError as err:
        show.display.clear()
        print(f"larscale sweep submit: {err}", file=sys.stderr)
        return 1
    except TimeoutError as err:
        show.display.clear()
        print(f"larscale sweep submit: --wait: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        raise UsageError(str(err)) from None
    show.display.clear()
    print(f"manifest: {manifest.path}")
    _print_states(manifest)
    bad = [r for r in manifest.points.values() if r.state in ("failed", "missing", "interrupted")]
    return 1 if bad else 0


def _print_states(manifest) -> None:
    from jobs.attempts import describe

    width = max([14, *(len(str(rec.job_id or "-")) for rec in manifest.points.values())])
    print(f"{'point':<28} {'state':<12} {'job':<{width}} {'attempts':<20} reason")
    for rec in manifest.points.values():
        print(f"{rec.point_id:<28} {rec.state:<12} {str(rec.job_id or '-'):<{width}} {describe(rec):<20} "
              f"{rec.reason or ''}".rstrip())
    print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(manifest.counts().items())))


def run_status(args: argparse.Namespace) -> int:
    from jobs.submit import status
    from larscale import UsageError

    try:
        manifest = status(args.output)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.format == "json":
        print(json.dumps(status_summary(manifest), indent=2))
        return 0
    _print_states(manifest)
    return 0


def status_summary(manifest) -> dict:
    """`sweep status --format json`: a stable shape for scripts (one entry per point, in plan order)."""
    from jobs.attempts import describe

    return {"sweep": manifest.name, "output_dir": manifest.output_dir, "scheduler": manifest.scheduler,
            "counts": manifest.counts(),
            "points": [{"point_id": r.point_id, "state": r.state, "job_id": r.job_id, "chain": list(r.chain),
                        "exit_status": r.exit_status, "reason": r.reason, "attempts": len(r.attempts),
                        "attempts_text": describe(r), "run_dir": r.run_dir, "params": r.params}
                       for r in manifest.points.values()]}


def run_demo(args: argparse.Namespace) -> int:
    from jobs.demo import DemoConfig, run_demo

    return run_demo(DemoConfig.make(args.out, quick=args.quick, fresh=args.fresh, scheduler=args.scheduler,
                                    figures=args.figures))


def run_bench_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from larscale import UsageError
    from larscale.benchformat import format_table, write_csv
    from larscale.benchimport import BenchImportError, parse_nccl_tests, parse_osu

    try:
        text = Path(args.log).read_text(errors="replace")
    except OSError as err:
        raise UsageError(f"{args.log}: {err.strerror}") from None
    try:
        if args.tool == "nccl-tests":
            rows = parse_nccl_tests(text, ranks=args.ranks, nodes=args.nodes, library=args.library or "nccl")
        else:
            if args.ranks is None:
                raise UsageError("--ranks is required for OSU output (osu_allreduce does not print it)")
            rows = parse_osu(text, ranks=args.ranks, nodes=args.nodes or 1, library=args.library or "mpi")
    except BenchImportError as err:
        raise UsageError(f"{args.log}: {err}") from None
    print(format_table(rows))
    print(f"wrote {write_csv(rows, args.out)}")
    return 0


def run_collect(args: argparse.Namespace) -> int:
    from jobs.collect import collect
    from larscale import UsageError

    try:
        result = collect(args.output)
    except ValueError as err:
        raise UsageError(str(err)) from None
    table = result.table
    columns = [c for c in ("point_id", "nodes", "ranks", "global_batch", "batch_per_rank", "state",
                           "images_per_s", "ci95_low", "ci95_high", "median_step_s") if c in table.columns]
    print(table[columns].to_string(index=False) if len(table) else "(no points)")
    print(f"wrote {result.csv_path} and {result.parquet_path}")
    if result.problems:
        print(f"{len(result.problems)} problem(s), {result.malformed} malformed record(s):", file=sys.stderr)
        for problem in result.problems:
            print(f"  {problem}", file=sys.stderr)
    return 1 if args.strict and result.problems else 0
