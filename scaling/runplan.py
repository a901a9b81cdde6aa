"""Run planning: batch arithmetic, length, learning-rate schedule and dataset facts, fixed before the first step.

The same on every rank: a pure function of the configuration, the rank count and the training set's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaling.config import DEFAULT_BATCH_PER_RANK, DEFAULT_STEPS, LOCAL_MODELS, TrainConfig, usage_error


@dataclass(frozen=True)
class BatchPlan:
    batch_per_rank: int
    accumulation: int
    global_batch: int


def resolve_batch(global_batch: int | None, batch_per_rank: int | None, accumulation: int, ranks: int) -> BatchPlan:
    """Complete ``global = per_rank × ranks × accumulation`` from the options given; inconsistency is an error."""
    if accumulation < 1:
        raise usage_error(f"--accumulation must be >= 1, got {accumulation}")
    if global_batch is None:
        per_rank = batch_per_rank if batch_per_rank is not None else DEFAULT_BATCH_PER_RANK
        return BatchPlan(per_rank, accumulation, per_rank * ranks * accumulation)
    if global_batch % (ranks * accumulation):
        raise usage_error(f"--global-batch {global_batch} is not divisible by ranks × accumulation = "
                          f"{ranks} × {accumulation}")
    per_rank = global_batch // (ranks * accumulation)
    if batch_per_rank is not None and batch_per_rank != per_rank:
        raise usage_error(f"--global-batch {global_batch} and --batch-per-rank {batch_per_rank} disagree: with "
                          f"{ranks} ranks and accumulation {accumulation} the per-rank batch is {per_rank}")
    return BatchPlan(per_rank, accumulation, global_batch)


@dataclass
class RunPlan:
    """What the run will do, fixed once the rank count and the dataset size are known."""

    batch: BatchPlan
    steps_per_epoch: int
    total_steps: int
    image_size: int
    num_classes: int
    base_lr: float
    warmup_steps: int
    weight_decay: float
    trust_coefficient: float
    momentum: float
    schedule: Any  # scaling.schedules.LRSchedule

    def lr_at(self, step: int) -> float:
        return float(self.schedule.lr_at(step))


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def make_plan(config: TrainConfig, ranks: int, train_size: int, image_size: int, num_classes: int) -> RunPlan:
    """Batch, length and LR schedule of the run (the same on every rank)."""
    from scaling.data import steps_per_epoch
    from scaling.schedules import LRSchedule

    batch = resolve_batch(config.global_batch, config.batch_per_rank, config.accumulation, ranks)
    try:
        per_epoch = steps_per_epoch(train_size, batch.global_batch)
    except ValueError as err:
        raise usage_error(str(err)) from None
    if config.epochs is not None:
        total = max(1, math.ceil(config.epochs * per_epoch))
    else:
        total = config.steps if config.steps is not None else DEFAULT_STEPS
    preset_values: Any = {}
    if config.lr_preset:
        from scaling.schedules import preset

        try:
            preset_values = preset(config.model, batch.global_batch)
        except (ValueError, KeyError) as err:
            raise usage_error(f"--lr-preset: {err}") from None
        if config.steps is None and config.epochs is None:
            total = max(1, math.ceil(float(preset_values.epochs) * per_epoch))

    def pick(explicit: Any, name: str, default: float) -> float:
        """An explicit option wins, then the preset's value, then the default."""
        if explicit is not None:
            return float(explicit)
        value = _field(preset_values, name)
        return float(value) if value is not None else default

    base_lr = pick(config.lr, "base_lr", 0.1 * batch.global_batch / 256)  # Goyal et al.'s linear rule
    if config.warmup_steps is not None:
        warmup = config.warmup_steps
    else:
        warmup = int(round(pick(config.warmup_epochs, "warmup_epochs", 0.0) * per_epoch))
    warmup = min(warmup, total)
    weight_decay = pick(config.weight_decay, "weight_decay", 5e-4)
    trust = pick(config.trust_coefficient, "trust_coefficient", 0.001)
    momentum = pick(config.momentum, "momentum", 0.9)
    try:
        schedule = LRSchedule(base_lr=base_lr, total_steps=total, warmup_steps=warmup,
                              warmup_start_lr=min(pick(config.warmup_start_lr, "warmup_start_lr", 0.0), base_lr),
                              end_lr=pick(config.end_lr, "end_lr", 0.0), kind=config.schedule,
                              power=pick(config.power, "power", 2.0))
    except ValueError as err:
        raise usage_error(f"learning-rate schedule: {err}") from None
    return RunPlan(batch, per_epoch, total, image_size, num_classes, base_lr, warmup, weight_decay, trust,
                   momentum, schedule)


def train_set_size(spec: Any, seed: int) -> int:
    """Samples in the training set (the plan needs it before the data is loaded)."""
    from scaling import data

    if spec.kind == "synthetic":
        return data.IMAGENET_TRAIN_IMAGES
    if spec.kind == "digits":
        return len(data.load_digits(8, seed).train_y)
    return len(data.list_image_folder(spec.path / "train")[0])


def dataset_facts(config: TrainConfig) -> tuple[Any, int, int]:
    """(DatasetSpec, image size, number of classes) with the defaults filled in; errors are UsageErrors."""
    from scaling.data import DIGITS_CLASSES, IMAGENET_CLASSES, DataError, parse_dataset

    try:
        spec = parse_dataset(config.dataset)
    except DataError as err:
        raise usage_error(str(err)) from None
    if config.model not in LOCAL_MODELS:
        import models

        if config.model not in models.names():
            raise usage_error(f"unknown model {config.model!r}; choose one of "
                              f"{', '.join([*models.names(), *LOCAL_MODELS])}")
        native = models.input_size(config.model)
    else:
        native = 32
    if spec.kind == "digits":
        image_size = config.image_size or 32
        classes = config.num_classes or DIGITS_CLASSES
        if classes != DIGITS_CLASSES:
            raise usage_error(f"--num-classes {classes}: digits has {DIGITS_CLASSES} classes")
    elif spec.kind == "imagenet":
        image_size = config.image_size or native
        classes = config.num_classes or len([p for p in (spec.path / "train").iterdir() if p.is_dir()])
    else:
        image_size = config.image_size or native
        classes = config.num_classes or IMAGENET_CLASSES
    return spec, image_size, classes


def check_output_dir(out: str) -> None:
    """--out must be writable before anything starts (a read-only mount or a path under a file is one clear
    error now, not a traceback at the first log line or checkpoint)."""
    from larscale.runformat import OutputDirError, check_writable_dir

    try:
        check_writable_dir(out)
        for sub in ("steps", "checkpoints"):  # exist already in a resumed run: may be read-only on their own
            if (Path(out) / sub).is_dir():
                check_writable_dir(Path(out) / sub)
    except OutputDirError as err:
        raise usage_error(f"--out {err}") from None


def checkpoints_planned(every: int, start_step: int, total_steps: int) -> int:
    """Checkpoints a run writes from ``start_step``: one per multiple of ``every`` before the end, and the last."""
    if start_step >= total_steps:
        return 1
    periodic = ((total_steps - 1) // every - start_step // every) if every else 0
    return periodic + 1
