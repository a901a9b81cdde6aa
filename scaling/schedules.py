"""Learning-rate schedules, LR scaling rules and the paper's presets. Pure Python (no torch, no TensorFlow).

Schedule (``LRSchedule``), with steps counted from 0, W = ``warmup_steps``, T = ``total_steps``:

* warm-up, 0 ≤ t < W: linear from ``warmup_start_lr`` (at t = 0) towards ``base_lr`` (reached at t = W):
  lr = start·(1 − t/W) + base·t/W;
* decay, W ≤ t ≤ T − 1, progress p = (t − W)/(T − 1 − W), lr = base·f + end·(1 − f) with
  f = (1 − p)^power ("poly", power 2 in the LARS paper) or f = (1 + cos πp)/2 ("cosine"), so lr(W) = base_lr and
  lr(T − 1) = end_lr exactly; "step" multiplies base_lr by ``gamma`` at each of ``milestones`` (absolute steps;
  default 30/90, 60/90, 80/90 of T, the classic ImageNet recipe) and ignores ``end_lr``.
* t ≥ T returns lr(T − 1). When the warm-up takes every step (W ≥ T − 1) there is no decay phase.

Scaling rules (``scale_lr``) from a reference batch B₀: linear lr·B/B₀, square-root lr·√(B/B₀), none.

Presets (``preset``): the LARS paper's tables (``scaling/presets.yaml``; AlexNet, AlexNet-BN, ResNet-50,
GoogLeNet) and the MLPerf ResNet-50 rule. A batch that is a table row gives that row. A batch between two rows
gives **log-linear interpolation**: with x = log2(batch), every quantity that differs between the neighbouring
rows (base LR, warm-up epochs, epochs) is interpolated linearly in x; the paper's accuracy is not (None). A batch
outside the rows that have a legible LR raises ``PresetRangeError`` unless ``extrapolate=True``; then, below the
smallest row, the smallest row is used with its LR scaled linearly with the batch (the linear scaling rule), and
above the largest row the largest row is held unchanged (the tables show the LARS LR saturating with batch:
AlexNet-BN 23 → 22, GoogLeNet 10 from 4K on) — and the result says ``extrapolated=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from numbers import Integral, Real
from pathlib import Path
from typing import Any

__all__ = ["LRSchedule", "Preset", "PresetRangeError", "SCALING_RULES", "SCHEDULE_KINDS", "epochs_study",
           "paper_table", "preset", "preset_models", "scale_lr"]

SCHEDULE_KINDS = ("poly", "step", "cosine")
SCALING_RULES = ("linear", "sqrt", "none")
PRESETS_FILE = Path(__file__).with_name("presets.yaml")
# The classic ImageNet step schedule: decay by gamma after 30, 60 and 80 of 90 epochs.
DEFAULT_STEP_FRACTIONS = (30 / 90, 60 / 90, 80 / 90)


# The `larscale train` option behind each checked value: errors name both, so a command-line user sees the
# option to change and a Python caller the argument.
OPTIONS = {"base_lr": "--lr", "total_steps": "--steps", "warmup_steps": "--warmup-steps",
           "warmup_start_lr": "--warmup-start-lr", "end_lr": "--end-lr", "power": "--power",
           "epochs": "--epochs", "warmup_epochs": "--warmup-epochs", "global_batch": "--global-batch"}


def _label(name: str) -> str:
    return f"{name} ({OPTIONS[name]})" if name in OPTIONS else name


def _number(name: str, value: Any, low: float | None = None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
        raise ValueError(f"{_label(name)} must be a number, got {value!r}")
    value = float(value)
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{_label(name)} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    return value


def _integer(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{_label(name)} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{_label(name)} must be >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class LRSchedule:
    """Per-iteration learning rate: linear warm-up, then poly / step / cosine decay (module docstring)."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    end_lr: float = 0.0
    kind: str = "poly"
    power: float = 2.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _number("base_lr", self.base_lr, 0.0)
        _integer("total_steps", self.total_steps, 1)
        _integer("warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"{_label('warmup_steps')} = {self.warmup_steps} must not exceed "
                             f"{_label('total_steps')} = {self.total_steps}")
        _number("warmup_start_lr", self.warmup_start_lr, 0.0)
        _number("end_lr", self.end_lr, 0.0)
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind (--schedule) must be one of {', '.join(SCHEDULE_KINDS)}, "
                             f"got {self.kind!r}")
        _number("power", self.power, 0.0, low_open=True)
        _number("gamma", self.gamma, 0.0)
        milestones = tuple(_integer("milestone", m, 0) for m in self.milestones)
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones!r}")
        object.__setattr__(self, "milestones", milestones)

    @classmethod
    def from_epochs(cls, base_lr: float, epochs: float, steps_per_epoch: int, warmup_epochs: float = 0.0,
                    **kwargs: Any) -> LRSchedule:
        """Schedule of ceil(epochs·steps_per_epoch) steps with round(warmup_epochs·steps_per_epoch) warm-up steps."""
        _number("epochs", epochs, 0.0, low_open=True)
        _integer("steps_per_epoch", steps_per_epoch, 1)
        _number("warmup_epochs", warmup_epochs, 0.0)
        total = max(1, math.ceil(epochs * steps_per_epoch))
        warmup = min(total, int(round(warmup_epochs * steps_per_epoch)))
        return cls(base_lr=base_lr, total_steps=total, warmup_steps=warmup, **kwargs)

    @property
    def step_milestones(self) -> tuple[int, ...]:
        """The milestones of the "step" kind (the defaults resolved against total_steps)."""
        if self.milestones:
            return self.milestones
        return tuple(int(round(f * self.total_steps)) for f in DEFAULT_STEP_FRACTIONS)

    def lr_at(self, step: int) -> float:
        """Learning rate of iteration ``step`` (0-based; steps past the end give the last step's rate)."""
        step = _integer("step", step, 0)
        last = self.total_steps - 1
        step = min(step, last)
        warmup = self.warmup_steps
        if step < warmup:
            a = step / warmup
            return self.warmup_start_lr * (1.0 - a) + self.base_lr * a
        if self.kind == "step":
            drops = sum(1 for m in self.step_milestones if step >= m)
            return self.base_lr * self.gamma**drops
        span = last - warmup
        if span <= 0:
            return self.base_lr
        p = (step - warmup) / span
        if self.kind == "poly":
            f = (1.0 - p) ** self.power
        else:
            f = 0.5 * (1.0 + math.cos(math.pi * p))
        # base·f + end·(1 − f) is exact at both ends: f = 1 gives base_lr, f = 0 gives end_lr.
        return self.base_lr * f + self.end_lr * (1.0 - f)

    __call__ = lr_at

    def lrs(self) -> list[float]:
        """The rate of every step, 0 … total_steps − 1."""
        return [self.lr_at(t) for t in range(self.total_steps)]


def scale_lr(base_lr: float, global_batch: int, reference_batch: int = 256, rule: str = "linear") -> float:
    """``base_lr`` tuned at ``reference_batch`` carried to ``global_batch`` by ``rule`` (linear, sqrt, none)."""
    base_lr = _number("base_lr", base_lr, 0.0)
    global_batch = _integer("global_batch", global_batch, 1)
    reference_batch = _integer("reference_batch", reference_batch, 1)
    if rule == "linear":
        return base_lr * global_batch / reference_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / reference_batch)
    if rule == "none":
        return base_lr
    raise ValueError(f"LR scaling rule must be one of {', '.join(SCALING_RULES)}, got {rule!r}")


class PresetRangeError(ValueError):
    """The batch lies outside the rows of a preset table (pass ``extrapolate=True`` to accept a guess)."""


@dataclass(frozen=True)
class Preset:
    """Settings for one model and global batch from a paper table.

    ``rule`` says how they were obtained: "table" (a row), "interpolated" (log-linear between ``rows``),
    "band" (the MLPerf rule), "extrapolated" (outside the table, with ``extrapolate=True``).
    """

    model: str
    global_batch: int
    base_lr: float
    warmup_epochs: float
    epochs: float
    weight_decay: float
    trust_coefficient: float
    momentum: float
    power: float
    end_lr: float
    warmup_start_lr: float
    top1: float | None
    top1_extended_aug: float | None
    table: str
    rule: str
    rows: tuple[int, ...]
    extrapolated: bool
    uncertain: bool
    notes: tuple[str, ...] = field(default=())

    def schedule(self, steps_per_epoch: int, kind: str = "poly") -> LRSchedule:
        """The LR schedule these settings describe, for ``steps_per_epoch`` iterations per epoch."""
        return LRSchedule.from_epochs(self.base_lr, self.epochs, steps_per_epoch, self.warmup_epochs,
                                      warmup_start_lr=min(self.warmup_start_lr, self.base_lr), end_lr=self.end_lr,
                                      kind=kind, power=self.power)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@lru_cache(maxsize=1)
def _load() -> dict[str, Any]:
    import yaml

    with open(PRESETS_FILE, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if data.get("schema") != "larscale.presets/1":
        raise ValueError(f"{PRESETS_FILE}: unknown schema {data.get('schema')!r}")
    return data


def _canonical(model: str, table: str) -> tuple[str, dict[str, Any]]:
    data = _load()
    if table not in data["tables"]:
        raise ValueError(f"unknown preset table {table!r}; choose one of {', '.join(data['tables'])}")
    if not isinstance(model, str):
        raise ValueError(f"model must be a name, got {model!r}")
    name = model.strip().lower()
    name = data["aliases"].get(name, name)
    models = data["tables"][table]
    if name not in models:
        raise ValueError(f"no {table} preset for model {model!r}; presets exist for {', '.join(sorted(models))}")
    return name, models[name]


def preset_models(table: str = "paper") -> list[str]:
    """Models with a preset in ``table`` ("paper" or "mlperf")."""
    data = _load()
    if table not in data["tables"]:
        raise ValueError(f"unknown preset table {table!r}; choose one of {', '.join(data['tables'])}")
    return sorted(data["tables"][table])


def paper_table(model: str, table: str = "paper") -> list[dict[str, Any]]:
    """The table's rows (or MLPerf bands) for ``model``, each merged with the model's defaults."""
    _, entry = _canonical(model, table)
    return [{**entry["defaults"], **row} for row in entry.get("rows", entry.get("bands", []))]


def epochs_study(model: str) -> dict[str, Any]:
    """The paper's accuracy against training length at a fixed batch (Table 5): {batch, top1_by_epochs}."""
    name, _ = _canonical(model, "paper")
    studies = _load()["epochs_studies"]
    if name not in studies:
        raise ValueError(f"no epochs study for {model!r}; there are studies for {', '.join(sorted(studies))}")
    return {"batch": studies[name]["batch"],
            "top1_by_epochs": {int(k): float(v) for k, v in studies[name]["top1_by_epochs"].items()}}


def _make(name: str, entry: dict[str, Any], table: str, batch: int, values: dict[str, Any], rule: str,
          rows: tuple[int, ...], extrapolated: bool, uncertain: bool, extra_notes: tuple[str, ...] = ()) -> Preset:
    merged = {**entry["defaults"], **values}

    def opt_float(key: str) -> float | None:
        return None if merged.get(key) is None else float(merged[key])

    return Preset(model=name, global_batch=batch, base_lr=float(merged["base_lr"]),
                  warmup_epochs=float(merged.get("warmup_epochs", 0.0)), epochs=float(merged["epochs"]),
                  weight_decay=float(merged["weight_decay"]), trust_coefficient=float(merged["trust_coefficient"]),
                  momentum=float(merged["momentum"]), power=float(merged["power"]), end_lr=float(merged["end_lr"]),
                  warmup_start_lr=float(merged["warmup_start_lr"]), top1=opt_float("top1"),
                  top1_extended_aug=opt_float("top1_extended_aug"), table=table, rule=rule, rows=rows,
                  extrapolated=extrapolated, uncertain=uncertain,
                  notes=tuple(entry.get("notes", ())) + extra_notes)


_INTERPOLATED = ("base_lr", "warmup_epochs", "epochs")


def preset(model: str, global_batch: int, *, table: str = "paper", extrapolate: bool = False) -> Preset:
    """The paper's settings for ``model`` at ``global_batch`` (rules for batches between or outside the table rows
    in the module docstring). Raises ``PresetRangeError`` outside the table unless ``extrapolate=True``."""
    batch = _integer("global_batch", global_batch, 1)
    name, entry = _canonical(model, table)
    if "bands" in entry:
        band = [b for b in entry["bands"] if batch >= b["min_batch"]][-1]
        return _make(name, entry, table, batch, {k: v for k, v in band.items() if k != "min_batch"}, "band",
                     (int(band["min_batch"]),), False, False)

    usable = [r for r in entry["rows"] if r.get("base_lr") is not None]
    lowest, highest = usable[0], usable[-1]
    for row in usable:
        if row["batch"] == batch:
            return _make(name, entry, table, batch, row, "table", (batch,), False, bool(row.get("uncertain")))
    if lowest["batch"] < batch < highest["batch"]:
        below = max((r for r in usable if r["batch"] < batch), key=lambda r: r["batch"])
        above = min((r for r in usable if r["batch"] > batch), key=lambda r: r["batch"])
        x = (math.log2(batch) - math.log2(below["batch"])) / (math.log2(above["batch"]) - math.log2(below["batch"]))
        lo, hi = {**entry["defaults"], **below}, {**entry["defaults"], **above}
        values = {key: lo[key] * (1 - x) + hi[key] * x for key in _INTERPOLATED if key in lo}
        values["top1"] = values["top1_extended_aug"] = None
        return _make(name, entry, table, batch, values, "interpolated", (below["batch"], above["batch"]), False,
                     bool(below.get("uncertain") or above.get("uncertain")))

    legible = f"rows with a legible LR: {', '.join(str(r['batch']) for r in usable)}"
    if not extrapolate:
        raise PresetRangeError(f"global batch {batch} is outside the {table} table for {name} ({legible}); "
                               "give the learning rate yourself with --lr (training.lr in a sweep spec) instead "
                               "of the preset, or use a global batch inside the table")
    if batch < lowest["batch"]:
        values = {**lowest, "base_lr": lowest["base_lr"] * batch / lowest["batch"], "top1": None,
                  "top1_extended_aug": None}
        how = f"extrapolated: LR of the {lowest['batch']} row scaled linearly to {batch}"
        row = lowest
    else:
        values = {**highest, "top1": None, "top1_extended_aug": None}
        how = f"extrapolated: the {highest['batch']} row held unchanged for {batch}"
        row = highest
    return _make(name, entry, table, batch, values, "extrapolated", (int(row["batch"]),), True,
                   bool(row.get("uncertain")), (how,))
