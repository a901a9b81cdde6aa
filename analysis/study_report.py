"""`larscale report`'s page: the study of :mod:`analysis.scaling_study` written into a report directory.

``OUT/index.md`` and the self-contained ``OUT/index.html`` (:class:`analysis.report.Report`), the plots (PNG + SVG),
every table as CSV and Parquet under ``OUT/data/``, the calibrated profile as ``OUT/profile.yaml`` and
``OUT/summary.json`` for scripts. The sweep directories are only read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from analysis.scaling_study import (
    StudyOptions,
    allocation,
    calibrate_on_smaller,
    points_table,
    problems_table,
    project,
)
from analysis.sweepdirs import ReportError, Sweep


@dataclass(frozen=True)
class StudyReport:
    index: Path
    summary: dict[str, Any]
    figures: list[Path]


def _percent(frame, columns: Sequence[str]):
    shown = frame.copy()
    for column in columns:
        if column in shown:
            shown[column] = [f"{x:+.1%}" if x == x else "–" for x in shown[column]]
    return shown


def _count_label(points) -> tuple[str, str]:
    """(column, axis label): nodes when the points span nodes, else ranks on one node."""
    if points["nodes"].nunique() > 1:
        return "nodes", "nodes"
    return "ranks", "ranks on one node" if points["nodes"].max() == 1 else "ranks"


def write_study(sweeps: Sequence[Sweep], base, options: StudyOptions, out: Path, title: str | None = None,
                say: Callable[[str], None] = print, command: str | None = None) -> StudyReport:
    """Compute the study and write the report directory ``out``; ``say`` gets the lines worth printing,
    ``command`` is the page's "how this was made" (default: the sweeps and ``out``).

    Everything is computed before anything is written, so an error leaves no partial report. A calibration the
    inputs cannot make (a model without a per-layer table) is said on the page; the measured part still stands.
    """
    from analysis.report import Report

    model = sweeps[0].model
    points = points_table(sweeps)
    problems = problems_table(sweeps)
    try:
        calibration, why_not = calibrate_on_smaller(base, sweeps, options), None
    except ReportError as err:
        calibration, why_not = None, str(err)
    projection = request = None
    if calibration is not None:
        projection = project(calibration, sweeps, options)
        request = allocation(calibration, projection, model, options)

    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, title or f"Scaling study: {model} on {base.name}")
    report.text(f"Sweeps: {', '.join(f'`{s.name}` ({s.kind}, {s.scheduler})' for s in sweeps)}; "
                f"{len(points)} measured point(s), {len(problems)} without a measurement. Base profile: `{base.name}`.")
    _measured_sections(report, points, problems, say)
    figures = _scaling_figures(report, points, model, out)
    summary: dict[str, Any] = {
        "model": model, "machine": base.name,
        "sweeps": [{"name": s.name, "path": str(s.path), "kind": s.kind, "scheduler": s.scheduler} for s in sweeps],
        "points": points.to_dict("records"), "problems": problems.to_dict("records")}
    if calibration is None:
        report.section("Calibrated model")
        report.text(f"None: {why_not}. The measured points above stand; no projection or allocation without it.")
        say(f"  ! no calibrated model: {why_not}")
        summary["calibration"] = {"error": why_not}
    else:
        figures += _model_sections(report, model, calibration, projection, request, base, options, say)
        summary.update(_model_summary(calibration, projection, request, options))
    command = command or "larscale report " + " ".join(str(s.path) for s in sweeps) + f" --out {out}"
    report.text(f"How this was made: `{command}`.")
    index = report.write()
    summary["command"] = command
    summary["files"] = {"index_md": "index.md", "index_html": "index.html",
                        "figures": [f.relative_to(out).as_posix() for f in figures],
                        "data": [f.relative_to(out).as_posix() for f in report.data_files]}
    report.summary(summary)
    return StudyReport(index=index, summary=summary, figures=figures)


def _measured_sections(report, points, problems, say: Callable[[str], None]) -> None:
    report.section("Measured points")
    report.text("Step time: the mean over measured steps (warm-up excluded) of the slowest rank's step, the "
                "runs' own step logs; images/s = global batch / step time. The parts are the slowest rank's "
                "medians: compute (forward + backward), exposed communication (blocked on the allreduce), data, "
                "optimizer. Speed-up and efficiency: against the sweep's smallest point; ideal = the ratio of "
                "ranks.")
    report.table(points[["sweep", "point", "nodes", "ranks", "global_batch", "batch_per_rank", "images_per_s",
                         "step_s", "compute_s", "exposed_comm_s", "data_s", "optimizer_s", "speedup",
                         "ideal_speedup", "efficiency"]])
    report.data("points", points)
    report.section("Points without a measurement")
    if problems.empty:
        report.text("None: every point of every sweep has a complete run.")
    else:
        report.text("Never dropped silently: each with its state and why.")
        report.table(problems[["sweep", "point", "nodes", "ranks", "global_batch", "state", "reason"]])
    report.data("problems", problems)
    for row in problems.itertuples():
        say(f"  ! {row.sweep}/{row.point}: {row.state}: {row.reason}")


def _scaling_figures(report, points, model: str, out: Path) -> list[Path]:
    from analysis import plots

    report.section("Scaling")
    column, xlabel = _count_label(points)
    strong, speedups, weak = {}, {}, {}
    for sweep, rows in points.groupby("sweep", sort=False):
        rows = rows.sort_values("ranks")
        if rows["kind"].iloc[0] == "weak":
            weak[sweep] = (rows[column].tolist(), rows["efficiency"].tolist())
        else:
            for batch, group in rows.groupby("global_batch"):
                strong[f"{sweep} (B={batch})"] = (group[column].tolist(), group["step_s"].tolist())
        speedups[sweep] = (rows[column].tolist(), rows["speedup"].tolist())
    figures = []
    if strong:
        figures += plots.strong_scaling(strong, out / "plots" / "strong_scaling", title=f"{model}: strong scaling",
                                        ylabel="seconds per step", xlabel=xlabel)
        report.plot("strong_scaling", figures[-2:], f"Strong scaling: step time vs {xlabel} (dashed: ideal).")
    figures += plots.speedup(speedups, out / "plots" / "speedup", title=f"{model}: speed-up", xlabel=xlabel)
    report.plot("speedup", figures[-2:], f"Speed-up over each sweep's smallest point vs {xlabel} (dashed: ideal).")
    if weak:
        figures += plots.weak_scaling_efficiency(weak, out / "plots" / "weak_scaling",
                                                 title=f"{model}: weak scaling efficiency", xlabel=xlabel)
        report.plot("weak_scaling", figures[-2:], "Weak scaling efficiency: images/s ÷ (ranks ratio × images/s at "
                                                   "the smallest point).")
    labels = [f"{r.sweep} {r.ranks}r B={r.global_batch}" for r in points.itertuples()]
    figures += plots.breakdown_bars(labels, {"compute": points["compute_s"], "exposed communication":
                                             points["exposed_comm_s"], "data": points["data_s"],
                                             "optimizer": points["optimizer_s"]}, out / "plots" / "breakdown",
                                    title=f"{model}: where a step goes (slowest-rank medians)")
    report.plot("breakdown", figures[-2:], "Per-phase breakdown of each measured point's step.")
    return figures


def _model_sections(report, model: str, calibration, projection, request, base, options: StudyOptions,
                    say: Callable[[str], None]) -> list[Path]:
    from analysis import plots
    from analysis.calibrate import profile_yaml

    out, comparison = report.out, calibration.comparison
    report.section("Calibrated model: fitted on the smaller points, checked on the larger")
    report.text(f"The base profile `{base.name}` calibrated (`larscale calibrate`'s fits) on the points of at most "
                f"{calibration.fit_max_ranks} rank(s)" + (f" and {len(options.bench)} bench CSV(s)"
                                                          if options.bench else "")
                + "; every point then predicted by it. Error = predicted / measured − 1. Profile: `profile.yaml`.")
    report.text("```text\n" + calibration.report + "\n```")
    report.table(_percent(comparison, ["error"]))
    report.data("predicted_vs_measured", comparison)
    figures = plots.predicted_vs_measured(
        [f"{r.sweep} {r.ranks}r B={r.global_batch} ({'fit' if r.role == 'fitted' else 'out of sample'})"
         for r in comparison.itertuples()], comparison["predicted_s"], comparison["measured_s"],
        out / "plots" / "predicted_vs_measured", tolerance=0.20, unit="s per step",
        title=f"{model}: predicted vs measured step time")
    report.plot("predicted_vs_measured", figures, "Predicted vs measured step time (band: ±20 %).")
    for row in comparison.itertuples():
        say(f"  {row.role:<13} {row.sweep}/{row.point}: {row.ranks} rank(s) B={row.global_batch}: predicted "
            f"{row.predicted_s:.4g} s, measured {row.measured_s:.4g} s, error {row.error:+.1%}")
    report.text("What the sweep could not identify:\n\n" + "\n".join(f"- {u}" for u in calibration.unidentified))
    (out / "profile.yaml").write_text(profile_yaml(calibration.data))

    report.section(f"Projection to {projection.nodes} node(s)")
    report.text(f"{projection.nodes} node(s) × {projection.ranks_per_node} rank(s) per node. "
                + " ".join(projection.notes))
    if not projection.table.empty:
        report.table(projection.table)
    report.data("projection", projection.table)

    table, notes = request
    report.section("Allocation request")
    report.text("\n".join(f"- {note}" for note in notes))
    if not table.empty:
        report.table(table)
    report.data("allocation", table)
    return figures


def _model_summary(calibration, projection, request, options: StudyOptions) -> dict[str, Any]:
    outside = calibration.out_of_sample
    table, notes = request
    return {
        "calibration": {"fit_max_ranks": calibration.fit_max_ranks, "profile": "profile.yaml",
                        "predicted_vs_measured": calibration.comparison.to_dict("records"),
                        "out_of_sample_max_abs_error": float(outside["error"].abs().max()) if not outside.empty
                        else None, "unidentified": calibration.unidentified},
        "projection": {"nodes": projection.nodes, "ranks_per_node": projection.ranks_per_node,
                       "band": list(projection.band), "scale_sigma": projection.scale_sigma,
                       "rows": projection.table.to_dict("records"),
                       "notes": projection.notes},
        "allocation": {"options": asdict(options), "rows": table.to_dict("records"), "notes": notes}}


SCALING_FIGURES = {"strong_scaling": "strong scaling: step time, dashed = ideal",
                   "speedup": "speed-up over the smallest point, dashed = ideal",
                   "weak_scaling": "weak scaling efficiency: images/s ÷ (ranks ratio × images/s at the smallest point)",
                   "breakdown": "where each measured step goes (slowest-rank medians)"}


def embed_study(report, study: StudyReport, what: str, command: str) -> None:
    """A written study summarised on another report's page (the demo's): a link to its page, its per-point
    table and its scaling figures."""
    import pandas as pd

    page = study.index.with_suffix(".html").relative_to(report.out).as_posix()
    report.text(f"**{what}**: `{command}` wrote [{page}]({page}) (tables, the profile fitted on the smaller points "
                "and checked on the larger ones, projection, allocation). Its measured points and figures:")
    report.table(pd.DataFrame(study.summary["points"])[
        ["sweep", "ranks", "global_batch", "images_per_s", "step_s", "compute_s", "exposed_comm_s", "data_s",
         "optimizer_s", "speedup", "efficiency"]])
    for figure in study.figures:
        if figure.suffix == ".png" and figure.stem in SCALING_FIGURES:
            report.plot(figure.stem, [figure], f"{what}: {SCALING_FIGURES[figure.stem]}.")
