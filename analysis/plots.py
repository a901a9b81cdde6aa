"""Plots of the performance model: pure functions of data and an output path, PNG and SVG each.

Every function takes plain data (numbers, labels), writes ``<path>.png`` and ``<path>.svg`` (the suffix of
``path``, if any, is replaced) with the matplotlib Agg backend, closes its figure and returns the two paths.
Axes carry units. ``reproduce``, ``plan`` and the calibration/demo reports call these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

FORMATS = ("png", "svg")


def _figure(width: float = 6.4, height: float = 4.2):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    return plt, fig, ax


def _save(plt, fig, path: str | Path) -> list[Path]:
    base = Path(path)
    base = base.with_suffix("") if base.suffix.lower() in (".png", ".svg") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    written = []
    for fmt in FORMATS:
        target = base.parent / f"{base.name}.{fmt}"
        fig.savefig(target, format=fmt)
        written.append(target)
    plt.close(fig)
    return written


def _count_axis(ax, values, label: str) -> None:
    """A log2 x axis of counts (nodes, ranks) ticked at the counts plotted, written as integers (2048, not 2^11)."""
    import matplotlib.ticker as ticker

    ticks = sorted({float(v) for v in values if v > 0})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([f"{int(round(t))}" for t in ticks]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)
    ax.set_xlabel(label)


def _plain_log_values(axis) -> None:
    """Numbers on a log axis written plainly (0.3, 2, 20), not as powers (3×10⁻¹)."""
    import matplotlib.ticker as ticker

    plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(plain)


def strong_scaling(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                   title: str = "Strong scaling", ylabel: str = "time per epoch (s)", xlabel: str = "nodes",
                   marks: Mapping[str, tuple[float, float]] | None = None) -> list[Path]:
    """Time vs count per series (log-log), each with its ideal line ``t₁·n₁/n`` from its first point.

    ``xlabel`` says what varies (``nodes``, ``ranks on one node``); ``marks`` adds labelled points (published).
    """
    plt, fig, ax = _figure()
    counts = []
    for label, (nodes, seconds) in series.items():
        nodes, seconds = np.asarray(nodes, float), np.asarray(seconds, float)
        counts += nodes.tolist()
        (line,) = ax.plot(nodes, seconds, "o-", label=label)
        ax.plot(nodes, seconds[0] * nodes[0] / nodes, "--", color=line.get_color(), alpha=0.6,
                label=f"{label}: ideal")
    for label, (nodes, value) in (marks or {}).items():
        ax.plot([nodes], [value], "k*", markersize=12)
        ax.annotate(label, (nodes, value), textcoords="offset points", xytext=(-10, 8), fontsize="small", ha="right")
    ax.set_yscale("log")
    _plain_log_values(ax.yaxis)
    _count_axis(ax, counts, xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def speedup(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
            title: str = "Speed-up", xlabel: str = "nodes") -> list[Path]:
    """Speed-up over the first point vs count per series (log-log), with the ideal line (the count ratio)."""
    plt, fig, ax = _figure()
    counts = []
    for label, (nodes, values) in series.items():
        nodes, values = np.asarray(nodes, float), np.asarray(values, float)
        counts += nodes.tolist()
        ax.plot(nodes, values, "o-", label=label)
    ticks = sorted(set(counts))
    if ticks:
        ax.plot(ticks, np.asarray(ticks) / ticks[0], "k--", lw=1, alpha=0.6, label="ideal")
    ax.set_yscale("log", base=2)
    _plain_log_values(ax.yaxis)
    _count_axis(ax, counts, xlabel)
    ax.set_ylabel("speed-up over the smallest point (x)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def weak_scaling_efficiency(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                            title: str = "Weak scaling efficiency (fixed batch per rank)",
                            xlabel: str = "nodes") -> list[Path]:
    """Efficiency (%) vs count per series, with the 100 % line; ``xlabel`` says what varies."""
    plt, fig, ax = _figure()
    counts, lowest = [], 100.0
    for label, (nodes, efficiency) in series.items():
        counts += list(np.asarray(nodes, float))
        lowest = min(lowest, float(np.min(100 * np.asarray(efficiency, float))))
        ax.plot(np.asarray(nodes, float), 100 * np.asarray(efficiency, float), "o-", label=label)
    ax.axhline(100, color="grey", lw=1, ls="--")
    _count_axis(ax, counts, xlabel)
    # From 0 when efficiency falls far; else a closer range so that a few per cent stay visible.
    ax.set_ylim(0 if lowest < 60 else 10 * math.floor((lowest - 5) / 10), 102)
    ax.set_ylabel("scaling efficiency (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def breakdown_bars(labels: Sequence[str], components: Mapping[str, Sequence[float]], path: str | Path,
                   title: str = "Iteration time breakdown", ylabel: str = "seconds per iteration",
                   totals: Sequence[float] | None = None) -> list[Path]:
    """Stacked bars, one per configuration, one layer per component (e.g. forward, backward, exposed comm).

    ``totals`` (e.g. the whole communication time, hidden or not) is drawn as a marker above each bar.
    """
    plt, fig, ax = _figure(max(8.0, 1.2 * len(labels) + 4.5))
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for name, values in components.items():
        values = np.asarray(values, float)
        ax.bar(x, values, 0.6, bottom=bottom, label=name)
        bottom += values
    if totals is not None:
        ax.plot(x, np.asarray(totals, float), "k_", markersize=30, mew=2, label="communication, total")
    ax.set_xticks(x, labels, rotation=15, ha="right", fontsize="small")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, path)


def time_to_train_vs_nodes(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                           title: str = "Predicted time to train",
                           marks: Mapping[str, tuple[float, float]] | None = None) -> list[Path]:
    """Time-to-train (minutes) vs nodes per model; ``marks`` adds labelled points (e.g. published values)."""
    plt, fig, ax = _figure()
    counts = []
    for label, (nodes, seconds) in series.items():
        counts += list(np.asarray(nodes, float))
        ax.plot(np.asarray(nodes, float), np.asarray(seconds, float) / 60, "o-", label=label)
    for label, (nodes, minutes) in (marks or {}).items():
        ax.plot([nodes], [minutes], "k*", markersize=12)
        ax.annotate(label, (nodes, minutes), textcoords="offset points", xytext=(6, 6), fontsize="small")
    ax.set_yscale("log")
    _plain_log_values(ax.yaxis)
    _count_axis(ax, counts, "nodes")
    ax.set_ylabel("time to train (min)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def predicted_vs_measured(labels: Sequence[str], predicted: Sequence[float], measured: Sequence[float],
                          path: str | Path, tolerance: float = 0.15, unit: str = "s",
                          title: str = "Predicted vs measured",
                          measured_label: str = "measured") -> list[Path]:
    """Scatter of predicted vs measured with the y = x line and a ±tolerance band; points labelled."""
    plt, fig, ax = _figure(5.6, 5.2)
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    lo = 0.8 * min(predicted.min(), measured.min())
    hi = 1.2 * max(predicted.max(), measured.max())
    line = np.array([lo, hi])
    ax.plot(line, line, "k-", lw=1, label="predicted = measured")
    ax.fill_between(line, line * (1 - tolerance), line * (1 + tolerance), color="grey", alpha=0.2,
                    label=f"±{tolerance:.0%}")
    ax.plot(measured, predicted, "o")
    for label, m, p in zip(labels, measured, predicted, strict=True):
        ax.annotate(label, (m, p), textcoords="offset points", xytext=(5, -10), fontsize="x-small")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"{measured_label} ({unit})")
    ax.set_ylabel(f"predicted ({unit})")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left")
    ax.grid(True, alpha=0.3)
    return _save(plt, fig, path)


def pareto_front(hours: Sequence[float], node_hours: Sequence[float], on_front: Sequence[bool],
                 path: str | Path, labels: Sequence[str] | None = None,
                 title: str = "Planning: time vs node-hours") -> list[Path]:
    """All candidate configurations, the Pareto-optimal ones highlighted, joined and labelled."""
    plt, fig, ax = _figure()
    hours, node_hours = np.asarray(hours, float), np.asarray(node_hours, float)
    front = np.asarray(on_front, bool)
    ax.plot(node_hours[~front], hours[~front], "o", color="lightgrey", label="candidates")
    order = np.argsort(node_hours[front])
    ax.plot(node_hours[front][order], hours[front][order], "o-", color="C3", label="Pareto front")
    if labels is not None:
        for i in np.flatnonzero(front):
            ax.annotate(labels[i], (node_hours[i], hours[i]), textcoords="offset points", xytext=(5, 4),
                        fontsize="x-small")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cost (node-hours)")
    ax.set_ylabel("wall time to train, all jobs (h)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def accuracy_vs_batch(tables: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                      title: str = "LARS: top-1 vs batch (seed tables)") -> list[Path]:
    """Top-1 (%) vs global batch (log2 axis), one line per network, table points marked."""
    plt, fig, ax = _figure()
    for label, (batches, top1) in tables.items():
        ax.plot(np.asarray(batches, float), np.asarray(top1, float), "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch (images)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def accuracy_vs_epochs(tables: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                       target: float | None = None, answer: tuple[float, float] | None = None,
                       title: str = "Top-1 vs epochs (seed tables), linear interpolation") -> list[Path]:
    """Top-1 vs epochs: table points with the piecewise-linear interpolation; optional target and answer."""
    plt, fig, ax = _figure()
    for label, (epochs, top1) in tables.items():
        ax.plot(np.asarray(epochs, float), np.asarray(top1, float), "o-", label=label)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:g}%")
    if answer is not None:
        ax.plot([answer[0]], [answer[1]], "k*", markersize=12, label=f"{answer[0]:.0f} epochs")
    ax.set_xlabel("epochs")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)
