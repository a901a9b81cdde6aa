"""`larscale demo`: the main job. A real, small scaling study on this machine, explained end to end.

1. plan a weak- and a strong-scaling sweep (1 and 2 ranks; ResNet-50 and AlexNet at a small per-rank batch,
   synthetic data, a few dozen steps) on the bundled ``local`` profile and print its cost;
2. run them as real Horovod jobs through the ``local`` scheduler (or Slurm), showing points done/running/failed;
3. run ``bench-comm``, calibrate the local profile from it and from the 1-rank runs, and put the calibrated
   model's prediction beside every measured point;
4. reproduce the seed papers' headline times from the bundled Stampede2 profiles;
5. answer a planning question on Stampede2 KNL (ResNet-50 to 74.9 % top-1 within a node-hour budget);
6. write a report directory (``index.md`` with every table and plot, the CSV/Parquet data behind them).

Nothing is precomputed. Re-running reuses finished points and the bench-comm CSV (the sweep manifests know
the points) unless ``--fresh``, which moves the previous output aside rather than deleting it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS = ("resnet50", "alexnet")


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    quick: bool = False
    fresh: bool = False
    scheduler: str = "local"
    steps: int = 30
    batch_per_rank: int = 2
    resnet_image_size: int = 224          # AlexNet's fully connected head fixes it at 227
    bench_max_bytes: str = "256M"

    @classmethod
    def make(cls, out: str | Path, quick: bool = False, fresh: bool = False, scheduler: str = "local") -> DemoConfig:
        if quick:
            # The same study, smaller: ResNet-50 at 64 px (12x less compute per image), fewer steps.
            return cls(Path(out), quick, fresh, scheduler, steps=12, batch_per_rank=2, resnet_image_size=64,
                       bench_max_bytes="64M")
        return cls(Path(out), quick, fresh, scheduler)


def image_size(cfg: DemoConfig, model: str) -> int:
    from models import input_size

    return cfg.resnet_image_size if model.startswith("resnet") else input_size(model)


def sweep_specs(cfg: DemoConfig) -> list[dict[str, Any]]:
    """Weak (fixed batch per rank) and strong (fixed global batch) sweeps over 1 and 2 ranks per model."""
    specs = []
    for model in MODELS:
        training = {"steps": cfg.steps, "optimizer": "lars", "lr": 0.1, "image_size": image_size(cfg, model),
                    "num_classes": 1000, "extra_args": ["--no-eval", "--measure-warmup-steps", "3"]}
        common = {"model": model, "framework": "torch", "dataset": "synthetic", "machine": "local",
                  "training": training, "job": {"walltime": "00:30:00"}}
        specs.append({**common, "name": f"{model}-weak",
                      "description": f"{model}: weak scaling, {cfg.batch_per_rank} images per rank",
                      "sweep": {"kind": "weak", "nodes": [1], "ranks_per_node": [1, 2],
                                "batch_per_rank": cfg.batch_per_rank, "threads_per_rank": 1}})
        specs.append({**common, "name": f"{model}-strong",
                      "description": f"{model}: strong scaling, global batch {2 * cfg.batch_per_rank}",
                      "sweep": {"kind": "strong", "nodes": [1], "ranks_per_node": [1, 2],
                                "global_batch": 2 * cfg.batch_per_rank, "threads_per_rank": 1}})
    return specs


def _say(message: str) -> None:
    print(message, flush=True)


def _step(number: int, title: str) -> None:
    _say(f"\n== {number}. {title}")


def slurm_reachable() -> str | None:
    """None when `sinfo` answers; else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo is not on PATH"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    return None if proc.returncode == 0 else f"sinfo failed: {proc.stderr.strip()[:200]}"


def prepare_output(cfg: DemoConfig) -> None:
    """--fresh moves the previous output aside (never deletes results); then check we can write there.

    Checked at start, so an unwritable or full output directory fails now, not after the runs.
    """
    from larscale import UsageError

    try:
        if cfg.fresh and cfg.out.is_dir() and any(cfg.out.iterdir()):
            backup = cfg.out.with_name(f"{cfg.out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            cfg.out.rename(backup)
            _say(f"--fresh: previous output moved to {backup}")
        cfg.out.mkdir(parents=True, exist_ok=True)
        probe = cfg.out / ".write-test"
        probe.write_bytes(b"\0" * 65536)
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to output directory {cfg.out}: {err.strerror or err}") from None


def run_sweeps(cfg: DemoConfig) -> tuple[list[Any], Any]:
    """Plan, print the cost, run every point; returns the plans and the collected results table."""
    import pandas as pd

    from jobs.collect import collect
    from jobs.submit import Progress, submit
    from jobs.sweep import describe, plan

    plans = [plan(spec, output_dir=cfg.out / "sweeps" / spec["name"]) for spec in sweep_specs(cfg)]
    for the_plan in plans:
        _say(describe(the_plan))
    total_points = sum(len(p.accepted) for p in plans)
    node_hours = sum(p.node_hours for p in plans)
    _say(f"\n{len(plans)} sweeps, {total_points} points, {node_hours:.3f} node-hours requested on 'local'")

    _step(2, f"run the sweeps as real Horovod jobs (scheduler: {cfg.scheduler})")
    counts = {"done": 0, "failed": 0}

    def show(name: str) -> Callable[[Progress], None]:
        def progress(event: Progress) -> None:
            _say(f"  [{name}] {event.point_id}: {event.state:<9} | points done {counts['done'] + event.done}"
                 f"/{total_points}, running {event.running}, failed {counts['failed'] + event.failed}")
        return progress

    tables = []
    for the_plan in plans:
        manifest = submit(the_plan, scheduler=cfg.scheduler, progress=show(the_plan.spec.name))
        if cfg.scheduler != "local":
            from jobs.submit import wait

            manifest = wait(the_plan.output_dir, timeout=3600)
        states = [rec.state for rec in manifest.points.values()]
        counts["done"] += states.count("complete")
        counts["failed"] += sum(s not in ("complete", "refused") for s in states)
        result = collect(the_plan.output_dir)
        for problem in result.problems:
            _say(f"  ! {problem}")
        tables.append(result.table)
    _say(f"  finished: {counts['done']} points complete, {counts['failed']} failed")
    return plans, pd.concat(tables, ignore_index=True)


def bench_comm(cfg: DemoConfig) -> Path:
    csv_path = cfg.out / "bench-comm.csv"
    if csv_path.exists():
        _say(f"  reusing {csv_path} (--fresh to measure again)")
        return csv_path
    argv = [sys.executable, "-m", "larscale", "bench-comm", "--ranks", "2", "--max-bytes", cfg.bench_max_bytes,
            "--factor", "4", "--warmup", "2", "--repetitions", "6", "--max-seconds-per-size", "3",
            "--operations", "allreduce,reduce_local", "--label", "local shared memory",
            "--launcher-args", "--mca mpi_yield_when_idle 1", "--out", str(csv_path)]
    _say("  " + " ".join(argv[1:]))
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return csv_path


def calibrate_local(cfg: DemoConfig, bench_csv: Path, one_rank_runs: list[Path]) -> Path:
    out = cfg.out / "local-calibrated.yaml"
    argv = [sys.executable, "-m", "larscale", "calibrate", "--machine", "local", "--bench", str(bench_csv),
            "--runs", *map(str, one_rank_runs), "--out", str(out), "--name", "local-calibrated"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"larscale calibrate failed:\n{proc.stdout}\n{proc.stderr}")
    _say("\n".join("  " + line for line in proc.stdout.strip().splitlines()[-12:]))
    return out


def run_demo(cfg: DemoConfig) -> int:
    import pandas as pd

    from analysis import plots
    from analysis.machine import load_machine
    from analysis.plan import format_plan
    from analysis.plan import plan as plan_allocation
    from analysis.report import Report, markdown_table
    from analysis.reproduce import headline_table, reproduce
    from analysis.validate import compare_runs
    from larscale import UsageError

    if cfg.scheduler == "slurm":
        why = slurm_reachable()
        if why:
            raise UsageError(f"--scheduler slurm: no Slurm reachable ({why})")
    started = time.monotonic()
    prepare_output(cfg)
    report = Report(cfg.out, "larscale demo: a scaling study on this machine, explained")
    report.text(f"Mode: {'quick' if cfg.quick else 'full'}; scheduler: {cfg.scheduler}; {cfg.steps} steps per "
                f"point, {cfg.batch_per_rank} images per rank (weak) / global batch {2 * cfg.batch_per_rank} "
                f"(strong); ResNet-50 at {cfg.resnet_image_size} px, AlexNet at 227 px; synthetic data; "
                "LARS; one thread per rank.")

    _step(1, "plan a weak- and a strong-scaling sweep on the 'local' machine")
    plans, results = run_sweeps(cfg)
    results = results.sort_values(["model", "sweep", "ranks"]).reset_index(drop=True)
    report.data("measured", results)
    complete = results[results["state"] == "complete"] if "state" in results else results
    if complete.empty:
        _say("no point completed: see the logs under " + str(cfg.out / "sweeps"))
        return 1

    report.section("1-2. Measured points")
    columns = [c for c in ("sweep", "model", "ranks", "global_batch", "batch_per_rank", "images_per_s",
                           "median_step_s", "mean_compute_s", "mean_allreduce_s", "mean_optimizer_s",
                           "mean_data_s", "state") if c in results]
    report.table(results[columns])
    strong, weak, bars = {}, {}, {"labels": [], "compute": [], "allreduce (blocked)": [], "optimizer": [],
                                 "data": []}
    for model in MODELS:
        rows = complete[complete["model"] == model]
        s = rows[rows["sweep"] == f"{model}-strong"].sort_values("ranks")
        w = rows[rows["sweep"] == f"{model}-weak"].sort_values("ranks")
        if len(s) >= 2:
            strong[model] = (s["ranks"].tolist(), s["median_step_s"].tolist())
        if len(w) >= 2:
            base = w["images_per_s"].iloc[0] / w["ranks"].iloc[0]
            weak[model] = (w["ranks"].tolist(), (w["images_per_s"] / (w["ranks"] * base)).tolist())
        for _, r in pd.concat([w, s]).drop_duplicates(["ranks", "global_batch"]).iterrows():
            bars["labels"].append(f"{model} {int(r['ranks'])}r B={int(r['global_batch'])}")
            bars["compute"].append(r["mean_compute_s"])
            bars["allreduce (blocked)"].append(r["mean_allreduce_s"])
            bars["optimizer"].append(r["mean_optimizer_s"])
            bars["data"].append(r["mean_data_s"])
    if strong:
        report.plot("strong_scaling", plots.strong_scaling(
            strong, cfg.out / "plots" / "strong_scaling", title="Strong scaling on this machine (measured)",
            ylabel="seconds per iteration"), "Strong scaling: iteration time vs ranks (the x axis counts ranks "
            "on one node), dashed = ideal.")
    if weak:
        report.plot("weak_scaling", plots.weak_scaling_efficiency(
            weak, cfg.out / "plots" / "weak_scaling", title="Weak scaling efficiency on this machine (measured)"),
            "Weak scaling efficiency: images/s at p ranks ÷ (p × images/s at 1 rank).")
    labels = bars.pop("labels")
    report.plot("breakdown", plots.breakdown_bars(labels, bars, cfg.out / "plots" / "breakdown",
                                                  title="Measured iteration breakdown (slowest-rank medians)"),
                "Where each measured iteration goes: forward+backward, time blocked on the allreduce, optimizer "
                "step, data.")

    _step(3, "bench-comm, calibrate the local profile, predict every point")
    bench_csv = bench_comm(cfg)
    one_rank = [Path(d) for d in complete[complete["ranks"] == 1]["run_dir"]]
    profile_path = calibrate_local(cfg, bench_csv, one_rank)
    comparison = pd.DataFrame(compare_runs([Path(d) for d in complete["run_dir"]], load_machine(profile_path)))
    comparison = comparison.drop_duplicates(["model", "ranks", "global_batch"])
    report.data("predicted_vs_measured", comparison)
    report.section("3. Predicted vs measured (calibrated local profile)")
    report.text(f"Calibrated from `{bench_csv.name}` (bench-comm, 2 ranks) and the 1-rank runs; profile: "
                f"`{profile_path.name}`. Error = predicted / measured − 1.")
    report.table(comparison[["model", "ranks", "global_batch", "predicted_s", "predicted_compute_s",
                             "predicted_comm_exposed_s", "measured_s", "measured_allreduce_s", "error"]])
    report.plot("predicted_vs_measured", plots.predicted_vs_measured(
        [f"{m} {r}r B={b}" for m, r, b in zip(comparison["model"], comparison["ranks"], comparison["global_batch"],
                                            strict=True)],
        comparison["predicted_s"], comparison["measured_s"], cfg.out / "plots" / "predicted_vs_measured",
        title="Iteration time on this machine: predicted vs measured"), "Predicted vs measured iteration time.")
    for r in comparison.itertuples():
        _say(f"  {r.model:<14} {r.ranks} rank(s) B={r.global_batch:<3} predicted {r.predicted_s:7.3f} s  "
             f"measured {r.measured_s:7.3f} s  error {r.error:+6.1%}")

    _step(4, "reproduce the seed papers' headline times from the bundled Stampede2 profiles")
    seed = reproduce(cfg.out / "reproduce")
    _say(headline_table(seed.rows))
    report.section("4. The seed papers' headline results, predicted")
    report.text(headline_table(seed.rows))
    for path in seed.files:
        if path.suffix == ".png":
            report.plot(path.stem, [path], path.stem.replace("_", " "))

    _step(5, "plan: ResNet-50 to 74.9 % top-1 on Stampede2 KNL within a node-hour budget")
    question = dict(model="resnet50", machine="stampede2-knl", target_top1=74.9, budget_node_hours=2000.0,
                    max_walltime="02:00:00")
    answer = plan_allocation(**question)
    _say(format_plan(answer, top=10))
    front = pd.DataFrame([vars(r) | {"label": r.label} for r in answer.front])
    report.data("plan_pareto_front", front)
    report.section("5. Planning: ResNet-50 to 74.9 % top-1 on Stampede2 KNL, ≤ 2000 node-hours, 2 h jobs")
    report.text("```\n" + format_plan(answer, top=10) + "\n```")
    everything = answer.rows
    report.plot("pareto", plots.pareto_front([r.wall_s / 3600 for r in everything],
                                             [r.node_hours for r in everything], [r.pareto for r in everything],
                                             cfg.out / "plots" / "pareto", labels=[r.label for r in everything]),
                "Time vs node-hours for every feasible configuration; the Pareto front is highlighted.")

    report.section("How this was made")
    report.text(markdown_table(pd.DataFrame([{"step": "sweep specs", "where": "sweeps/*/manifest.json"},
                                             {"step": "run logs", "where": "sweeps/*/runs/*/"},
                                             {"step": "bench-comm", "where": bench_csv.name},
                                             {"step": "calibrated profile", "where": profile_path.name}])))
    index = report.write()
    _say(f"\nreport: {index} ({time.monotonic() - started:.0f} s)")
    return 0 if len(complete) == len(results) else 1
