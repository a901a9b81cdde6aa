"""Time-to-accuracy from the seed tables: the epochs a network needs to reach a target top-1 at a batch size.

Data: ``analysis/data/seed_accuracy.yaml`` (LARS paper, Tables 3-6; ICPP 2018's 74.9 % in 64 epochs at 32K),
per table an *accuracy-vs-batch* table (each row: batch, epochs trained, top-1) and, for AlexNet-BN and
ResNet-50, an *accuracy-vs-epochs* curve at one fixed batch ``B_c``. Each table belongs to one data-augmentation
regime; a model may have several (ResNet-50: ``minimal``, ``extended``, ``icpp2018``). A question about a model
is answered in each of its regimes (or the one asked for) and the answer needing the fewest epochs is returned,
naming its regime. The method, stated in every answer:

1. Batch. ``B`` must lie within the table's batches (never extrapolated). Between two rows the base
   accuracy ``a₀(B)`` and base epochs ``E₀(B)`` are interpolated linearly in ``log2 B``.
2. Target at or below ``a₀(B)``: ``E₀(B)`` epochs reach it. The tables hold no shorter run, so this is an
   upper bound ("at most"), never a guess below the data.
3. Target above ``a₀(B)``: the accuracy gained by training longer is read from the epochs curve,
   piecewise linear between its points, and added to the batch's base accuracy:
   ``a(B, E) = a₀(B) + c(E) − c(E₀)`` for ``E₀ ≤ E ≤ E_max`` of the curve. At ``B = B_c`` this is the
   curve itself; at other batches it assumes the same gain from longer training (stated in the answer).
   The answer is the smallest such E that reaches the target.
4. A target above every table value of the network, or unreachable within the curve at this batch, or a
   network without a curve when more epochs are needed, is a clear error naming the best table value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

DATA = Path(__file__).with_name("data") / "seed_accuracy.yaml"


class AccuracyError(ValueError):
    """A question the seed tables cannot answer without extrapolating (or an unknown network)."""


@dataclass(frozen=True)
class BatchRow:
    batch: int
    epochs: float
    top1: float | None
    lr: float | None = None


@dataclass(frozen=True)
class EpochsRow:
    epochs: float
    top1: float


@dataclass(frozen=True)
class AccuracyTable:
    network: str
    description: str
    models: tuple[str, ...]
    batch_table: str
    batch_rows: tuple[BatchRow, ...]
    epochs_table: str | None = None
    epochs_batch: int | None = None
    epochs_rows: tuple[EpochsRow, ...] = ()
    ocr_notes: tuple[str, ...] = ()
    augmentation: str = "standard"
    source: str = ""

    @property
    def known_rows(self) -> tuple[BatchRow, ...]:
        return tuple(r for r in self.batch_rows if r.top1 is not None)

    @property
    def best_top1(self) -> float:
        return max([r.top1 for r in self.known_rows] + [r.top1 for r in self.epochs_rows])


@dataclass(frozen=True)
class TimeToAccuracy:
    """The answer, with the data points it came from and how it was obtained."""

    network: str
    batch: int
    target_top1: float
    epochs: float
    top1_at_epochs: float
    bound: str                       # "exact" (a table point), "interpolated", or "at_most" (see module doc)
    method: str
    points: list[dict[str, Any]] = field(default_factory=list)   # the table rows used: batch, epochs, top1
    curve: list[dict[str, Any]] = field(default_factory=list)    # a(B, E) along the epochs curve, if used
    augmentation: str = "standard"                               # the regime of the table that answered
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network, "batch": self.batch, "target_top1": self.target_top1,
                "epochs": self.epochs, "top1_at_epochs": self.top1_at_epochs, "bound": self.bound,
                "augmentation": self.augmentation, "source": self.source,
                "method": self.method, "points": self.points, "curve": self.curve}


def _parse(network: str, doc: dict[str, Any]) -> AccuracyTable:
    batch = doc["accuracy_vs_batch"]
    default_epochs = batch.get("epochs")
    rows = tuple(BatchRow(batch=int(r["batch"]), epochs=float(r.get("epochs", default_epochs)),
                          top1=None if r.get("top1") is None else float(r["top1"]), lr=r.get("lr"))
                 for r in batch["rows"])
    curve = doc.get("accuracy_vs_epochs")
    notes = list(batch.get("ocr_notes", [])) + list((curve or {}).get("ocr_notes", []))
    return AccuracyTable(
        network=network, description=doc.get("description", ""), models=tuple(doc.get("models", [])),
        batch_table=batch.get("table", ""), batch_rows=rows,
        epochs_table=curve.get("table") if curve else None,
        epochs_batch=int(curve["batch"]) if curve else None,
        epochs_rows=tuple(EpochsRow(float(r["epochs"]), float(r["top1"])) for r in curve["rows"]) if curve else (),
        ocr_notes=tuple(notes), augmentation=str(doc.get("augmentation", "standard")),
        source=str(doc.get("source", "")))


@cache
def _load(path: str) -> dict[str, AccuracyTable]:
    doc = yaml.safe_load(Path(path).read_text())
    return {name: _parse(name, d) for name, d in doc["networks"].items()}


def accuracy_tables(path: Path = DATA) -> dict[str, AccuracyTable]:
    """Every seed table by network name (read once per file)."""
    return dict(_load(str(path)))


def tables_for(name: str, path: Path = DATA, augmentation: str | None = None) -> list[AccuracyTable]:
    """Every table of a model name (``resnet50_v1``: its extended, minimal and icpp2018 regimes) in file order,
    or the one table of a table name that is no model's (``resnet50_min_aug``); only ``augmentation``'s when
    given."""
    tables = accuracy_tables(path)
    found = [t for t in tables.values() if name in t.models]
    if not found and name in tables:
        found = [tables[name]]
    if not found:
        known = sorted(set(tables) | {m for t in tables.values() for m in t.models})
        raise AccuracyError(f"no seed accuracy table for {name!r}; tables exist for: {', '.join(known)}")
    if augmentation is not None:
        regimes = sorted({t.augmentation for t in found})
        found = [t for t in found if t.augmentation == augmentation]
        if not found:
            raise AccuracyError(f"no seed accuracy table for {name!r} with augmentation {augmentation!r}; "
                                f"it has: {', '.join(regimes)}")
    return found


def table_for(name: str, path: Path = DATA) -> AccuracyTable:
    """The first table of a table or model name (``resnet50_v1`` → resnet50, the extended-augmentation one)."""
    return tables_for(name, path)[0]


def _lerp(x: float, x0: float, x1: float, y0: float, y1: float) -> float:
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def base_point(table: AccuracyTable, batch: int) -> tuple[float, float, list[BatchRow], str]:
    """``(E₀, a₀, rows used, bound)`` at ``batch`` from the accuracy-vs-batch table (step 1)."""
    rows = sorted(table.known_rows, key=lambda r: r.batch)
    if not rows:
        raise AccuracyError(f"{table.network}: the accuracy-vs-batch table has no readable value")
    lo, hi = rows[0].batch, rows[-1].batch
    if not lo <= batch <= hi:
        raise AccuracyError(f"batch {batch} is outside the {table.network} table ({lo}..{hi}, {table.batch_table}): "
                            "the seed data say nothing there and larscale does not extrapolate")
    for row in rows:
        if row.batch == batch:
            return row.epochs, row.top1, [row], "exact"
    upper = next(i for i, r in enumerate(rows) if r.batch > batch)
    a, b = rows[upper - 1], rows[upper]
    x, x0, x1 = math.log2(batch), math.log2(a.batch), math.log2(b.batch)
    return _lerp(x, x0, x1, a.epochs, b.epochs), _lerp(x, x0, x1, a.top1, b.top1), [a, b], "interpolated"


def _curve_value(rows: tuple[EpochsRow, ...], epochs: float) -> float:
    for a, b in zip(rows, rows[1:], strict=False):
        if a.epochs <= epochs <= b.epochs:
            return _lerp(epochs, a.epochs, b.epochs, a.top1, b.top1)
    raise AccuracyError(f"{epochs} epochs is outside the epochs curve ({rows[0].epochs}..{rows[-1].epochs})")


def epochs_to_accuracy(name: str, batch: int, target_top1: float, path: Path = DATA,
                       augmentation: str | None = None) -> TimeToAccuracy:
    """Epochs needed to reach ``target_top1`` (%) at global ``batch`` (see the module docstring): in each of
    the name's augmentation regimes (or ``augmentation``'s), the fewest epochs of those that answer."""
    tables = tables_for(name, path, augmentation)
    target = float(target_top1)
    if not 0 < target <= 100:
        raise AccuracyError(f"target top-1 must be a percentage in (0, 100], got {target_top1!r}")
    best = max(tables, key=lambda t: t.best_top1)
    if target > best.best_top1:
        names = ", ".join(t.network for t in tables)
        raise AccuracyError(f"target top-1 {target:g}% is above every value in the {names} tables "
                            f"(best {best.best_top1:g}%, {best.augmentation} augmentation)")
    answers: list[TimeToAccuracy] = []
    errors: list[tuple[AccuracyTable, AccuracyError]] = []
    for table in tables:
        if target > table.best_top1:
            errors.append((table, AccuracyError(f"target above the table's best {table.best_top1:g}%")))
            continue
        try:
            answers.append(_epochs_in_table(table, batch, target))
        except AccuracyError as err:
            errors.append((table, err))
    if answers:
        return min(answers, key=lambda a: a.epochs)      # file order breaks ties
    if len(errors) == 1:
        raise errors[0][1]
    raise AccuracyError(f"target top-1 {target:g}% is not reached at B={batch} in any augmentation regime of "
                        f"{name}: " + "; ".join(f"{t.augmentation} ({t.network}): {e}" for t, e in errors))


def _epochs_in_table(table: AccuracyTable, batch: int, target: float) -> TimeToAccuracy:
    """The answer from one table (one augmentation regime); AccuracyError when that table cannot say."""
    regime = {"augmentation": table.augmentation, "source": table.source}
    e0, a0, used, bound = base_point(table, batch)
    points = [{"batch": r.batch, "epochs": r.epochs, "top1": r.top1, "table": table.batch_table} for r in used]
    where = ("the table row" if bound == "exact" else
             f"linear in log2(batch) between B={used[0].batch} and B={used[1].batch}")
    if target <= a0:
        reached = bound == "exact" and math.isclose(target, a0)      # the table's own result, exactly
        return TimeToAccuracy(
            network=table.network, batch=batch, target_top1=target, epochs=e0, top1_at_epochs=a0,
            bound="exact" if reached else "at_most",
            method=(f"{table.batch_table}: {a0:.2f}% after {e0:g} epochs at B={batch} ({where}); "
                    + ("the published result itself" if reached else
                       f"the target is at or below it, so at most {e0:g} epochs (no shorter run in the tables)")),
            points=points, **regime)
    curve = table.epochs_rows
    if not curve:
        raise AccuracyError(f"target top-1 {target:g}% needs more than the {e0:g} epochs of {table.batch_table} "
                            f"at B={batch} ({a0:.2f}%), and {table.network} has no accuracy-vs-epochs table")
    if not curve[0].epochs <= e0 <= curve[-1].epochs:
        raise AccuracyError(f"{table.network}: base epochs {e0:g} at B={batch} is outside the epochs curve "
                            f"({curve[0].epochs:g}..{curve[-1].epochs:g})")
    c0 = _curve_value(curve, e0)
    knots = [e0] + [r.epochs for r in curve if r.epochs > e0]
    values = [a0 + _curve_value(curve, e) - c0 for e in knots]
    points += [{"batch": table.epochs_batch, "epochs": r.epochs, "top1": r.top1, "table": table.epochs_table}
               for r in curve]
    path_points = [{"batch": batch, "epochs": e, "top1": v} for e, v in zip(knots, values, strict=True)]
    transfer = ("" if batch == table.epochs_batch else
                f"; the gain from longer training is measured at B={table.epochs_batch} and assumed the same at "
                f"B={batch}")
    # values[0] = a0 < target: the first knot at or above the target closes the crossing segment.
    for i in range(1, len(knots)):
        if values[i] >= target:
            epochs = _lerp(target, values[i - 1], values[i], knots[i - 1], knots[i])
            exact = any(math.isclose(epochs, r.epochs) for r in curve) and batch == table.epochs_batch
            return TimeToAccuracy(
                network=table.network, batch=batch, target_top1=target, epochs=epochs, top1_at_epochs=target,
                bound="exact" if exact else "interpolated",
                method=(f"a(B,E) = a0(B) + c(E) - c({e0:g}): a0 = {a0:.2f}% from {table.batch_table} ({where}), "
                        f"c = {table.epochs_table} at B={table.epochs_batch}, piecewise linear in epochs"
                        f"{transfer}"),
                points=points, curve=path_points, **regime)
    best = max(values)
    raise AccuracyError(f"target top-1 {target:g}% is not reached at B={batch} within the {table.network} tables: "
                        f"best {best:.2f}% at {knots[values.index(best)]:g} epochs")
