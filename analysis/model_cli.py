"""`larscale predict | reproduce | plan | time-to-accuracy`: the performance model's subcommands.

Parsers only at import time (cheap); each handler imports numpy, matplotlib and the model inside itself.
Library ValueErrors (unknown model or machine, nodes beyond the machine, a batch that does not divide, a
target above the tables) become one-line usage errors (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator


def print_profile_notes(machine: str, precision: str = "fp32", max_nodes: int | None = 1) -> None:
    """One line on stderr per field the profile leaves to the compute model's defaults, and one where the
    prediction goes where the validation set shows the model optimistic (mixed precision across nodes).
    ``max_nodes``: the most nodes predicted (None: the machine's limit, as a plan may use them all)."""
    from analysis.params import mixed_precision_scale_note, profile_notes
    from analysis.predict import resolve_machine

    profile = resolve_machine(machine)
    scale_note = mixed_precision_scale_note(profile, precision,
                                            profile.limits.max_nodes if max_nodes is None else max_nodes)
    for note in (*profile_notes(profile, precision), *([scale_note] if scale_note else [])):
        print(f"larscale: note: {note}", file=sys.stderr)


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    from larscale import UsageError

    try:
        yield
    except ValueError as err:
        raise UsageError(str(err)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="predict iteration time, time-to-train and throughput from the performance model",
        description="Predict the iteration time of data-parallel training (compute + exposed allreduce + data), "
        "the epoch and time-to-train, images/s and scaling efficiency. Several --nodes / --global-batch values "
        "give their grid. JSON: a list, one record per configuration (also for one), keys iteration_s, "
        "compute_s, comm_exposed_s, epoch_s, time_to_train_s, images_per_s, scaling_efficiency (stable), then the "
        "inputs and the breakdown.")
    p.add_argument("--model", required=True, help="model name (larscale models lists them)")
    p.add_argument("--machine", required=True, help="bundled machine profile name or a profile YAML path")
    p.add_argument("--nodes", required=True, type=int, nargs="+", help="node count(s)")
    p.add_argument("--global-batch", required=True, type=int, nargs="+", help="global batch size(s), images")
    p.add_argument("--epochs", type=float, default=90.0, help="epochs to train (default 90)")
    p.add_argument("--ranks-per-node", type=int, default=None, help="default: the profile's (one per device)")
    p.add_argument("--dataset-size", type=int, default=None, help="images per epoch (default ImageNet-1k, 1281167)")
    p.add_argument("--precision", default="fp32", help="peak to use from the profile (default fp32)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the model's native one)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--overlap", choices=("layerwise", "none"), default=None,
                   help="allreduces overlap the backward pass layer by layer, or start after it (a compiled "
                   "backward); default: the profile's network.overlap")
    p.add_argument("--compute-mode", choices=("eager", "compiled"), default=None,
                   help="kernel by kernel, or torch.compile / CUDA graphs (fused element-wise passes, replayed "
                   "launches); default: the profile's compute.mode")
    p.add_argument("--gradient-dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="width of the gradients on the wire (mixed precision keeps fp32; 16 bits with Horovod's "
                   "fp16 compression); default: the profile's network.collectives.gradient_dtype")
    p.add_argument("--format", choices=("text", "json", "csv"), default="text")
    p.set_defaults(handler=run_predict)

    r = subparsers.add_parser(
        "reproduce", help="predict the seed papers' time-to-train results beside the published ones",
        description="Predict AlexNet 100 epochs / 32K on 1024 Stampede2 SKX nodes (11 min) and ResNet-50 90 and 64 "
        "epochs / 32K on 2048 KNL (20 and 14 min) from the bundled profiles, with the error, and print the LARS "
        "accuracy tables. Exit 1 when a prediction is off by more than the tolerance.")
    r.add_argument("--out", help="directory for reproduce.md/.csv/.json and the plots (PNG + SVG)")
    r.add_argument("--no-plots", action="store_true", help="write the tables only")
    r.add_argument("--tolerance", type=float, default=0.10, help="allowed relative error (default 0.10)")
    r.add_argument("--format", choices=("text", "json"), default="text")
    r.set_defaults(handler=run_reproduce)

    pl = subparsers.add_parser(
        "plan", help="rank nodes x batch configurations to reach an accuracy (or epochs) within a budget",
        description="Capacity planning: for every feasible (nodes, global batch), the epochs to reach the target "
        "top-1 (seed tables, never extrapolated) or the given epochs, the predicted time, node-hours and the "
        "checkpoint/restart jobs the walltime limit requires; ranked by time, with the time vs node-hours "
        "Pareto front (* in the table).")
    pl.add_argument("--model", required=True)
    pl.add_argument("--machine", required=True)
    goal = pl.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-top1", type=float, help="target top-1 accuracy, %%")
    goal.add_argument("--epochs", type=float, help="train this many epochs instead of a target accuracy")
    pl.add_argument("--budget-node-hours", type=float, help="drop configurations costing more")
    pl.add_argument("--max-nodes", type=int, help="largest allocation to consider (default: the machine's limit)")
    pl.add_argument("--max-walltime", help="per-job walltime limit, HH:MM:SS or D-HH:MM:SS (default: the machine's)")
    pl.add_argument("--deadline", help="drop configurations whose wall time (all jobs) exceeds this, HH:MM:SS")
    pl.add_argument("--ranks-per-node", type=int)
    pl.add_argument("--batches", type=int, nargs="+", help="global batches to consider (default: powers of two)")
    pl.add_argument("--restart-overhead-s", type=float, default=120.0,
                    help="seconds each job of a checkpoint/restart chain loses to start-up (default 120)")
    pl.add_argument("--top", type=int, default=15, help="rows to print (default 15)")
    pl.add_argument("--precision", default="fp32", help="peak to use from the profile (default fp32; bf16 on "
                    "GPUs and on CPUs with AVX512-BF16 or AMX)")
    pl.add_argument("--compute-mode", choices=("eager", "compiled"), default=None,
                    help="eager or compiled steps (default: the profile's compute.mode)")
    pl.add_argument("--format", choices=("text", "json"), default="text")
    pl.add_argument("--out", help="directory for plan.json, plan.csv and the Pareto plot (PNG + SVG)")
    pl.add_argument("--emit-sweep", metavar="FILE",
                    help="also write a sweep spec (YAML, for `larscale sweep`) that checks the chosen configurations "
                    "at small scale: weak scaling at their batch per rank up to --emit-max-nodes nodes")
    pl.add_argument("--emit-max-nodes", type=int, default=4, help="largest node count of that sweep (default 4)")
    pl.add_argument("--emit-steps", type=int, default=100, help="steps per point of that sweep (default 100)")
    pl.set_defaults(handler=run_plan)

    t = subparsers.add_parser(
        "time-to-accuracy", help="epochs to reach a top-1 at a batch size, from the LARS seed tables",
        description="Epochs needed to reach a target top-1 at a global batch, from the seed tables (accuracy vs "
        "batch, accuracy vs epochs), with the data points and the interpolation used; a target the tables do "
        "not reach is an error, never an extrapolation.")
    t.add_argument("--model", required=True, help="model or table name (alexnet, alexnet_bn, resnet50, ...)")
    t.add_argument("--global-batch", required=True, type=int)
    t.add_argument("--target-top1", required=True, type=float, help="%%")
    t.add_argument("--augmentation", default=None,
                   help="one data-augmentation regime of the seed tables (standard, minimal, extended, icpp2018); "
                   "default: every regime of the model, the fewest epochs")
    t.add_argument("--machine", help="also predict the time to train on this machine")
    t.add_argument("--nodes", type=int, help="nodes for the time prediction (with --machine)")
    t.add_argument("--plot", help="write the accuracy-vs-epochs plot here (PNG + SVG)")
    t.add_argument("--format", choices=("text", "json"), default="text")
    t.set_defaults(handler=run_time_to_accuracy)


def _fmt_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def describe(record: dict) -> str:
    """A prediction as a readable breakdown (``larscale predict`` text format)."""
    r = record
    hidden = r["comm_hidden_s"] / r["comm_total_s"] if r["comm_total_s"] > 0 else 1.0
    lines = [
        f"{r['model']} on {r['machine']}: {r['nodes']} nodes x {r['ranks_per_node']} ranks, global batch "
        f"{r['global_batch']} ({r['batch_per_rank']} per rank), {r['epochs']:g} epochs",
        f"  iteration        {r['iteration_s']:.4f} s = compute {r['compute_s']:.4f} s + exposed communication "
        f"{r['comm_exposed_s']:.4f} s + slowest rank {r['jitter_s']:.4f} s + exposed data loading "
        f"{r['data_exposed_s']:.4f} s",
        f"    forward        {r['forward_s']:.4f} s",
        f"    backward       {r['backward_s']:.4f} s",
        f"    optimizer etc. {r['overhead_s']:.4f} s",
        f"    communication  {r['comm_total_s']:.4f} s in {r['buckets']} fused allreduces, {hidden:.0%} hidden behind "
        "the backward pass",
        f"    slowest rank   {r['jitter_s']:.4f} s waiting for it (step-time jitter)",
        f"    data loading   {r['data_s']:.4f} s per iteration",
        f"  epoch            {_fmt_seconds(r['epoch_s'])}",
        f"  time to train    {_fmt_seconds(r['time_to_train_s'])} ({r['iterations']} iterations)",
        f"  throughput       {r['images_per_s']:,.0f} images/s, scaling efficiency {r['scaling_efficiency']:.1%}",
        f"  cost             {r['node_hours']:,.1f} node-hours",
        f"  90 % interval    {r['images_per_s_low']:,.0f}-{r['images_per_s_high']:,.0f} images/s, "
        f"{_fmt_seconds(r['time_to_train_s_low'])} to {_fmt_seconds(r['time_to_train_s_high'])}, "
        f"{r['node_hours_low']:,.1f}-{r['node_hours_high']:,.1f} node-hours",
    ]
    return "\n".join(lines)


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from analysis.predict import KEYS, predict
    from analysis.workload import IMAGENET_TRAIN_IMAGES

    nodes, batch = np.meshgrid(np.array(args.nodes), np.array(args.global_batch), indexing="ij")
    with _usage_errors():
        print_profile_notes(args.machine, args.precision, max(args.nodes))
        result = predict(args.model, args.machine, nodes.reshape(-1), batch.reshape(-1), args.epochs,
                         args.ranks_per_node, args.dataset_size or IMAGENET_TRAIN_IMAGES, args.precision,
                         image_size=args.image_size, num_classes=args.num_classes, overlap=args.overlap,
                         compute_mode=args.compute_mode, gradient_dtype=args.gradient_dtype)
    records = result.records()
    if args.format == "json":
        json.dump(records, sys.stdout, indent=2)     # always a list: one shape for scripts, however many
        print()
    elif args.format == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    elif len(records) == 1:
        print(describe(records[0]))
    else:
        cols = ("nodes", "global_batch", "batch_per_rank") + KEYS + ("comm_total_s", "node_hours")
        print(" ".join(f"{c:>18}" for c in cols))
        for rec in records:
            print(" ".join(f"{rec[c]:>18.6g}" if isinstance(rec[c], float) else f"{rec[c]:>18}" for c in cols))
    return 0


def run_reproduce(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from analysis.reproduce import accuracy_markdown, device_table, headline_table, reproduce

    with _usage_errors():
        result = reproduce(args.out, tolerance=args.tolerance, make_plots=not args.no_plots)
    if args.format == "json":
        json.dump({"source": result.source, "tolerance": result.tolerance, "ok": result.ok,
                   "rows": [asdict(r) for r in result.rows], "files": [str(f) for f in result.files],
                   "devices": [asdict(r) for r in result.devices.rows] if result.devices else []},
                  sys.stdout, indent=2)
        print()
    else:
        print(f"Seed results predicted from the bundled profiles ({result.source}); tolerance ±{args.tolerance:.0%}\n")
        print(headline_table(result.rows))
        if result.devices is not None:
            print(f"\nSingle-device training throughput predicted from the device catalog; tolerance "
                  f"±{result.devices.tolerance:.0%}\n")
            print(device_table(result.devices))
            for key, source in result.devices.sources.items():
                print(f"  {key}: {source}")
        print("\nSeed accuracy tables (LARS 2017, ICPP 2018)\n")
        print(accuracy_markdown())
        for f in result.files:
            print(f"wrote {f}")
        print("all within tolerance" if result.ok else "SOME PREDICTIONS ARE OUTSIDE THE TOLERANCE")
    return 0 if result.ok else 1


def run_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from analysis.plan import format_plan, plan

    if args.top < 1:
        from larscale import UsageError

        raise UsageError(f"--top must be >= 1, got {args.top}")
    with _usage_errors():
        print_profile_notes(args.machine, args.precision, args.max_nodes)
        params = None
        if args.compute_mode is not None or args.precision != "fp32":
            from analysis.params import PerfParams
            from analysis.predict import resolve_machine

            params = PerfParams.from_machine(resolve_machine(args.machine), precision=args.precision,
                                             compute_mode=args.compute_mode)
        result = plan(args.model, args.machine, target_top1=args.target_top1, epochs=args.epochs,
                      budget_node_hours=args.budget_node_hours, max_nodes=args.max_nodes,
                      max_walltime=args.max_walltime, deadline=args.deadline, ranks_per_node=args.ranks_per_node,
                      batches=args.batches, restart_overhead_s=args.restart_overhead_s, params=params)
    if args.emit_sweep:
        _emit_sweep(result, args)
    if args.format == "json":
        json.dump(result.to_dict(args.top), sys.stdout, indent=2)
        print()
    else:
        print(format_plan(result, args.top))
        if args.emit_sweep:
            print(f"wrote {args.emit_sweep} (check at small scale: larscale sweep submit {args.emit_sweep})")
    if args.out:
        import csv
        from dataclasses import asdict

        from analysis import plots

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        with (out / "plan.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(result.rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in result.rows)
        files = plots.pareto_front([r.wall_s / 3600 for r in result.rows], [r.node_hours for r in result.rows],
                                   [r.pareto for r in result.rows], out / "plan_pareto",
                                   labels=[r.label for r in result.rows],
                                   title=f"{result.model} on {result.machine}: time vs node-hours")
        if args.format == "text":
            for f in [out / "plan.json", out / "plan.csv", *files]:
                print(f"wrote {f}")
    return 0


def _emit_sweep(result, args: argparse.Namespace) -> None:
    """Write --emit-sweep's spec (analysis.plan.check_sweep_spec) without overwriting a file that is not one."""
    from pathlib import Path

    import yaml

    from analysis.plan import check_sweep_spec
    from larscale import UsageError
    from larscale.machine import load_machine

    path = Path(args.emit_sweep)
    if path.is_dir():
        raise UsageError(f"--emit-sweep {path}: is a directory")
    machine = args.machine
    if Path(machine).is_file():
        machine = str(Path(machine).resolve())         # the spec may be used from another directory
    rows = result.front or result.rows
    profile = load_machine(args.machine)
    threads = max(1, profile.node.cores // rows[0].ranks_per_node)
    compute_mode = profile.compute.mode if args.compute_mode is None else args.compute_mode
    try:
        spec = check_sweep_spec(result, machine, max_nodes=args.emit_max_nodes, steps=args.emit_steps,
                                top=min(args.top, 3), threads_per_rank=threads, precision=args.precision,
                                compiled=compute_mode == "compiled")
    except ValueError as err:
        raise UsageError(f"--emit-sweep: {err}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by larscale plan --emit-sweep (what it checks: description).\n"
                    + yaml.safe_dump(spec, sort_keys=False, width=120))


def run_time_to_accuracy(args: argparse.Namespace) -> int:
    from analysis.accuracy import epochs_to_accuracy, table_for

    with _usage_errors():
        answer = epochs_to_accuracy(args.model, args.global_batch, args.target_top1,
                                    augmentation=args.augmentation)
        prediction = None
        if args.machine:
            if not args.nodes:
                raise ValueError("--machine needs --nodes")
            from analysis.predict import predict_point

            prediction = predict_point(args.model, args.machine, args.nodes, args.global_batch, answer.epochs)
    if args.plot:
        from analysis import plots

        table = table_for(answer.network)
        series = {}
        if table.epochs_rows:
            series[f"{table.epochs_table}, B={table.epochs_batch}"] = (
                [r.epochs for r in table.epochs_rows], [r.top1 for r in table.epochs_rows])
        if answer.curve:
            series[f"used at B={answer.batch}"] = ([p["epochs"] for p in answer.curve],
                                                   [p["top1"] for p in answer.curve])
        else:
            series[f"{table.batch_table} at B={answer.batch}"] = ([answer.epochs], [answer.top1_at_epochs])
        plots.accuracy_vs_epochs(series, args.plot, target=answer.target_top1,
                                 answer=(answer.epochs, answer.top1_at_epochs))
    if args.format == "json":
        out = answer.to_dict()
        if prediction is not None:
            out["prediction"] = prediction
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    bound = {"at_most": "at most ", "exact": "", "interpolated": "≈ "}[answer.bound]
    print(f"{answer.network}: top-1 {answer.target_top1:g}% at global batch {answer.batch} needs "
          f"{bound}{answer.epochs:.1f} epochs ({answer.augmentation} data augmentation)")
    print(f"source: {answer.source}")
    print(f"method: {answer.method}")
    print("data points (batch, epochs, top-1 %, table):")
    for pt in answer.points:
        print(f"  {pt['batch']:>6} {pt['epochs']:>6g} {pt['top1']:>6g}  {pt['table']}")
    if prediction is not None:
        print(f"on {prediction['machine']} with {prediction['nodes']} nodes: time to train "
              f"{_fmt_seconds(prediction['time_to_train_s'])}, {prediction['node_hours']:.1f} node-hours")
    return 0
