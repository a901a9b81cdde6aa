"""Reproduce the seed papers' time-to-train results from the bundled machine profiles.

Each published result of ``analysis/data/seed_results.yaml`` (ICPP 2018: AlexNet 100 epochs at 32K on 1024
Stampede2 SKX nodes in 11 min; ResNet-50 90 epochs at 32K on 2048 KNL in 20 min, 64 epochs in 14 min) is
predicted by :func:`analysis.predict.predict` — the same model and profiles ``larscale predict`` uses — and
set beside the published value with the relative error. The LARS accuracy tables
(``analysis/data/seed_accuracy.yaml``) are printed with them. Output: a Markdown table, CSV and JSON, and plots
(predicted vs published, iteration breakdown, strong scaling, weak scaling efficiency, time-to-train vs
nodes, accuracy vs batch and vs epochs).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from analysis.accuracy import accuracy_tables
from analysis.predict import predict, resolve_machine
from analysis.workload import load_workload

RESULTS = Path(__file__).with_name("data") / "seed_results.yaml"
DEVICE_FIGURES = Path(__file__).with_name("data") / "device_throughput.yaml"
TOLERANCE = 0.10


@dataclass(frozen=True)
class DeviceRow:
    """One device's published or measured training throughput beside the compute model's prediction."""

    device: str
    precision: str
    model: str
    batch: int
    published_images_per_s: float
    predicted_images_per_s: float
    error: float                 # predicted / published − 1
    forward_s: float
    backward_s: float
    overhead_s: float
    host_bound: bool             # the host's launch time, not the device, sets the step
    source: str
    note: str = ""


@dataclass(frozen=True)
class DeviceComparison:
    rows: list[DeviceRow]
    tolerance: float
    sources: dict[str, str]

    @property
    def ok(self) -> bool:
        return all(abs(r.error) <= self.tolerance for r in self.rows)


def device_comparison(path: Path = DEVICE_FIGURES) -> DeviceComparison:
    """Predict every single-device figure of ``device_throughput.yaml`` from the device catalog alone.

    Each device becomes a one-device machine (:func:`analysis.devices.machine_for_device`): peaks, bandwidth
    and SM count from the catalog, the kind's efficiency constants, nothing set for the device itself.
    """
    from analysis.devices import machine_for_device
    from analysis.params import PerfParams
    from analysis.roofline import roofline_curves

    doc = yaml.safe_load(Path(path).read_text())
    rows = []
    for fig in doc["figures"]:
        machine = machine_for_device(fig["device"], 1, 100.0, 1)
        p = predict(fig["model"], machine, 1, int(fig["batch"]), 1, precision=fig["precision"]).record(0)
        params = PerfParams.from_machine(machine, fig["precision"])
        curves = roofline_curves(load_workload(fig["model"]).layers, params.rates)
        host_s = curves.host_ops * params.host_s_per_op
        rows.append(DeviceRow(
            device=fig["device"], precision=fig["precision"], model=fig["model"], batch=int(fig["batch"]),
            published_images_per_s=float(fig["images_per_s"]), predicted_images_per_s=p["images_per_s"],
            error=p["images_per_s"] / float(fig["images_per_s"]) - 1, forward_s=p["forward_s"],
            backward_s=p["backward_s"], overhead_s=p["overhead_s"],
            host_bound=bool(host_s >= p["compute_s"] * (1 - 1e-9)), source=fig["source"], note=fig.get("note", "")))
    return DeviceComparison(rows=rows, tolerance=float(doc.get("tolerance", 0.2)), sources=dict(doc["sources"]))


def device_table(comparison: DeviceComparison) -> str:
    """Markdown: predicted vs published single-device throughput, with what bounds each step."""
    lines = ["| device | precision | model | batch | published img/s | predicted img/s | error | step (ms) | bound by "
             "| source |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in comparison.rows:
        step_ms = (r.forward_s + r.backward_s + r.overhead_s) * 1e3
        lines.append(f"| {r.device} | {r.precision} | {r.model} | {r.batch} | {r.published_images_per_s:,.0f} "
                     f"| {r.predicted_images_per_s:,.0f} | {r.error:+.1%} | {step_ms:.1f} "
                     f"| {'host launches' if r.host_bound else 'device'} | {r.source} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class HeadlineRow:
    label: str
    model: str
    machine: str
    nodes: int
    global_batch: int
    epochs: float
    published_minutes: float
    predicted_minutes: float
    error: float                 # (predicted − published) / published
    iteration_s: float
    compute_s: float
    comm_total_s: float
    comm_exposed_s: float
    images_per_s: float
    scaling_efficiency: float
    sustained_tflops_per_node: float

    @property
    def within(self) -> bool:
        return abs(self.error) <= TOLERANCE


@dataclass(frozen=True)
class Reproduction:
    rows: list[HeadlineRow]
    source: str
    files: list[Path]
    tolerance: float
    devices: DeviceComparison | None = None     # single-device figures (their own tolerance)

    @property
    def ok(self) -> bool:
        return (all(abs(r.error) <= self.tolerance for r in self.rows)
                and (self.devices is None or self.devices.ok))


def load_results(path: Path = RESULTS) -> tuple[str, list[dict[str, Any]]]:
    doc = yaml.safe_load(Path(path).read_text())
    return doc.get("source", ""), list(doc["results"])


def headline_rows(path: Path = RESULTS) -> tuple[str, list[HeadlineRow]]:
    """Predict every published result (scalar calls of the vectorised model)."""
    source, results = load_results(path)
    rows = []
    for r in results:
        machine = resolve_machine(r["machine"])
        p = predict(r["model"], machine, r["nodes"], r["global_batch"], r["epochs"]).record(0)
        flops = load_workload(r["model"]).flops_per_image * p["global_batch"] / p["nodes"]   # per node per step
        minutes = p["time_to_train_s"] / 60
        rows.append(HeadlineRow(
            label=r["label"], model=r["model"], machine=r["machine"], nodes=r["nodes"],
            global_batch=r["global_batch"], epochs=float(r["epochs"]), published_minutes=float(r["published_minutes"]),
            predicted_minutes=minutes, error=minutes / float(r["published_minutes"]) - 1,
            iteration_s=p["iteration_s"], compute_s=p["compute_s"], comm_total_s=p["comm_total_s"],
            comm_exposed_s=p["comm_exposed_s"], images_per_s=p["images_per_s"],
            scaling_efficiency=p["scaling_efficiency"], sustained_tflops_per_node=flops / p["compute_s"] / 1e12))
    return source, rows


def headline_table(rows: list[HeadlineRow]) -> str:
    """Markdown table: predicted vs published with the breakdown."""
    lines = ["| result | machine | published (min) | predicted (min) | error | iteration (s) | compute (s) "
             "| comm total (s) | comm exposed (s) | images/s | TFLOP/s per node |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.label} ({r.model}) | {r.machine} | {r.published_minutes:g} | {r.predicted_minutes:.1f} "
                     f"| {r.error:+.1%} | {r.iteration_s:.3f} | {r.compute_s:.3f} | {r.comm_total_s:.3f} "
                     f"| {r.comm_exposed_s:.4f} | {r.images_per_s:,.0f} | {r.sustained_tflops_per_node:.2f} |")
    return "\n".join(lines)


def accuracy_markdown() -> str:
    """The seed accuracy tables as Markdown, OCR notes included."""
    out = []
    for table in accuracy_tables().values():
        out.append(f"**{table.network}** — {table.description} ({table.batch_table}; {table.augmentation} "
                   f"augmentation; source: {table.source})\n")
        out.append("| batch | epochs | LR | top-1 (%) |\n|---|---|---|---|")
        for r in table.batch_rows:
            top1 = "unreadable" if r.top1 is None else f"{r.top1:g}"
            out.append(f"| {r.batch} | {r.epochs:g} | {'—' if r.lr is None else r.lr} | {top1} |")
        if table.epochs_rows:
            out.append(f"\n{table.epochs_table}, batch {table.epochs_batch}:\n\n| epochs | top-1 (%) |\n|---|---|")
            out.extend(f"| {r.epochs:g} | {r.top1:g} |" for r in table.epochs_rows)
        if table.ocr_notes:
            out.append("\nOCR readings: " + "; ".join(table.ocr_notes))
        out.append("")
    return "\n".join(out)


def _node_counts(machine_max: int, batch: int, ranks_per_node: int) -> list[int]:
    nodes = [2**k for k in range(0, 16) if 2**k <= machine_max]
    return [n for n in nodes if batch % (n * ranks_per_node) == 0]


def write_plots(rows: list[HeadlineRow], out_dir: Path, tolerance: float) -> list[Path]:
    from analysis import plots

    files: list[Path] = []
    files += plots.predicted_vs_measured([r.label for r in rows], [r.predicted_minutes for r in rows],
                                         [r.published_minutes for r in rows], out_dir / "reproduce_vs_published",
                                         tolerance=tolerance, unit="min", measured_label="published",
                                         title="Time to train: predicted vs published")
    points = [predict(r.model, r.machine, r.nodes, r.global_batch, r.epochs).record(0) for r in rows]
    files += plots.breakdown_bars(
        [r.label.split(",")[0] + f", {r.epochs:g} ep" for r in rows],
        {"forward": [p["forward_s"] for p in points], "backward": [p["backward_s"] for p in points],
         "optimizer/overhead": [p["overhead_s"] for p in points],
         "exposed communication": [p["comm_exposed_s"] for p in points],
         "exposed data loading": [p["data_exposed_s"] for p in points]},
        out_dir / "reproduce_breakdown", totals=[p["comm_total_s"] for p in points],
        title="Seed results: predicted iteration breakdown")
    strong, ttt, weak, marks = {}, {}, {}, {}
    seen = set()
    for r in rows:
        machine = resolve_machine(r.machine)
        key = (r.model, r.machine, r.global_batch)
        marks[f"{r.published_minutes:g} min published"] = (r.nodes, r.published_minutes)
        if key in seen:
            continue
        seen.add(key)
        rpn = machine.default_ranks_per_node
        nodes = _node_counts(machine.limits.max_nodes, r.global_batch, rpn)
        pred = predict(r.model, machine, np.array(nodes), r.global_batch, r.epochs)
        name = f"{r.model} on {r.machine}, B={r.global_batch}"
        strong[name] = (nodes, pred.epoch_s)
        ttt[f"{name}, {r.epochs:g} epochs"] = (nodes, pred.time_to_train_s)
        per_rank = r.global_batch // (r.nodes * rpn)
        weak_nodes = np.array([n for n in _node_counts(machine.limits.max_nodes, 2**30, rpn)])
        weak_pred = predict(r.model, machine, weak_nodes, weak_nodes * rpn * per_rank, r.epochs)
        weak[f"{r.model} on {r.machine}, {per_rank} images per rank"] = (weak_nodes, weak_pred.scaling_efficiency)
    files += plots.strong_scaling(strong, out_dir / "reproduce_strong_scaling",
                                  title="Strong scaling at the published global batch")
    files += plots.time_to_train_vs_nodes(ttt, out_dir / "reproduce_time_to_train", marks=marks,
                                          title="Predicted time to train vs nodes (stars: published)")
    files += plots.weak_scaling_efficiency(weak, out_dir / "reproduce_weak_scaling")
    tables = accuracy_tables()
    files += plots.accuracy_vs_batch(
        {name: ([r.batch for r in t.known_rows], [r.top1 for r in t.known_rows]) for name, t in tables.items()
         if name != "googlenet"}, out_dir / "lars_accuracy_vs_batch",
        title="LARS: top-1 vs batch (seed tables, AlexNet 100 epochs, ResNet-50 100 epochs)")
    files += plots.accuracy_vs_epochs(
        {f"{name}, B={t.epochs_batch}": ([r.epochs for r in t.epochs_rows], [r.top1 for r in t.epochs_rows])
         for name, t in tables.items() if t.epochs_rows}, out_dir / "lars_accuracy_vs_epochs")
    return files


def target_machine_scaling(out_dir: str | Path, path: Path = RESULTS) -> list[Path]:
    """Predicted strong and weak scaling on the seed machines, 64 nodes up to the published runs, with them.

    Strong: time to train at the published global batch and epochs vs nodes (powers of two from 64 to the
    published node count), each published result a star. Weak: scaling efficiency at the published images per
    node, over the same nodes. The same model and profiles as every other prediction; nothing fitted.
    """
    from analysis import plots

    _, results = load_results(path)
    out = Path(out_dir)
    strong: dict[str, tuple[list[int], list[float]]] = {}
    weak: dict[str, tuple[list[int], list[float]]] = {}
    marks: dict[str, tuple[float, float]] = {}
    for r in results:
        machine = resolve_machine(r["machine"])
        rpn = machine.default_ranks_per_node
        nodes = [n for n in (2**k for k in range(6, 16)) if n <= r["nodes"] and r["global_batch"] % (n * rpn) == 0]
        pred = predict(r["model"], machine, np.array(nodes), r["global_batch"], r["epochs"])
        name = f"{r['model']} on {r['machine']}, B={r['global_batch']}, {r['epochs']:g} epochs"
        strong[name] = (nodes, (pred.time_to_train_s / 60).tolist())
        marks[f"{r['published_minutes']:g} min published"] = (r["nodes"], float(r["published_minutes"]))
        per_node = r["global_batch"] // (r["nodes"] * rpn)
        weak_pred = predict(r["model"], machine, np.array(nodes), np.array(nodes) * rpn * per_node, r["epochs"])
        weak[f"{r['model']} on {r['machine']}, {per_node} images per node"] = (nodes,
                                                                                weak_pred.scaling_efficiency.tolist())
    files = plots.strong_scaling(strong, out / "target_strong_scaling", ylabel="time to train (min)",
                                 title="Seed machines: predicted strong scaling (stars: published)", marks=marks)
    files += plots.weak_scaling_efficiency(weak, out / "target_weak_scaling",
                                           title="Seed machines: predicted weak scaling efficiency")
    return files


def reproduce(out_dir: str | Path | None = None, tolerance: float = TOLERANCE, make_plots: bool = True,
              results: Path = RESULTS) -> Reproduction:
    """Predict the published results and the single-device figures; with ``out_dir`` write
    reproduce.md/.csv/.json and the plots."""
    source, rows = headline_rows(results)
    devices = device_comparison()
    files: list[Path] = []
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md = out / "reproduce.md"
        md.write_text(f"# Seed results predicted by larscale\n\nSource: {source}. Tolerance ±{tolerance:.0%}.\n\n"
                      f"{headline_table(rows)}\n\n## Single-device training throughput, predicted from the device "
                      f"catalog (tolerance ±{devices.tolerance:.0%})\n\n{device_table(devices)}\n\n"
                      + "".join(f"- {k}: {v}\n" for k, v in devices.sources.items())
                      + f"\n## LARS accuracy tables\n\n{accuracy_markdown()}\n")
        with (out / "reproduce.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        (out / "reproduce.json").write_text(json.dumps({"source": source, "tolerance": tolerance,
                                                        "rows": [asdict(r) for r in rows],
                                                        "devices": [asdict(r) for r in devices.rows]},
                                                       indent=2) + "\n")
        files += [md, out / "reproduce.csv", out / "reproduce.json"]
        if make_plots:
            files += write_plots(rows, out, tolerance)
    return Reproduction(rows=rows, source=source, files=files, tolerance=tolerance, devices=devices)
