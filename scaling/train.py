"""Data-parallel training with Horovod, measured step by step: ``larscale train`` / ``python -m scaling.train``.

Every rank runs this program (``mpirun``, ``srun`` or ``horovodrun`` start them; alone it is a 1-rank run).
Horovod's ring-allreduce averages the gradients; the controller (MPI or Gloo) is whichever the launcher set
up. PyTorch by default, ``--framework tensorflow`` for the TF2 path (scaling/train_tf.py).

Batch arithmetic: ``global_batch = batch_per_rank × ranks × accumulation``; give either side, and both only
when they agree. One step is one optimizer update on ``global_batch`` images.

A step, per rank, is measured in phases (seconds, written to ``steps/rank-NNNNN.jsonl``):
``data_s`` waiting for the batch, ``compute_s`` forward + backward (the allreduces of ready gradients start
inside backward and overlap with it), ``allreduce_s`` blocked in ``optimizer.synchronize()`` waiting for the
remaining allreduces, ``optimizer_s`` the update under ``skip_synchronize()``, and ``step_s`` the whole
boundary-to-boundary time (so the ``step_s`` add up to the wall time of the loop). On GPU each phase ends with
a device synchronisation so that it measures finished work.

Stopping: SIGTERM and SIGUSR1 (Slurm sends one before the walltime) set a flag. At every step boundary the
ranks sum their flags with an allreduce launched one step earlier (so it overlaps a step and costs nothing),
and all stop at the same boundary: checkpoint, summary with status "interrupted", exit 75. A rank blocked in
a collective for longer than ``--stall-timeout`` (a peer died or hangs) exits non-zero through a watchdog
thread, so no launcher set-up can leave the survivors waiting forever.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import math
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from larscale.runformat import (
    DEFAULT_WARMUP_STEPS,
    EXIT_FAILED,
    EXIT_RESUMABLE,
    EXIT_STALLED,
    SCHEMA,
    TIME_KEYS,
    throughput_ci,
    validate_summary,
    write_json_atomic,
)

FRAMEWORKS = ("torch", "tensorflow")
OPTIMIZERS = ("lars", "sgd")
SCHEDULES = ("poly", "step", "cosine")
DEFAULT_BATCH_PER_RANK = 32
DEFAULT_STEPS = 100
# Trainer-local diagnostic network (not in models/): 2 conv + linear, no BatchNorm and no dropout, so a step
# on 2 ranks × b equals a step on 1 rank × 2b exactly up to rounding (BN would use per-rank batch statistics).
LOCAL_MODELS = ("tiny",)


class StopRequested(Exception):
    """All ranks agreed to stop at this step boundary (a rank received SIGTERM or SIGUSR1)."""


def usage_error(message: str) -> Exception:
    from larscale import UsageError

    return UsageError(message)


# ---------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Every option of a run; written verbatim into summary.json["config"] and into checkpoints."""

    model: str = "resnet50"
    framework: str = "torch"
    dataset: str = "synthetic"
    global_batch: int | None = None
    batch_per_rank: int | None = None
    accumulation: int = 1
    steps: int | None = None
    epochs: float | None = None
    optimizer: str = "lars"
    lr: float | None = None
    lr_preset: bool = False
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    warmup_start_lr: float | None = None
    end_lr: float | None = None
    schedule: str = "poly"
    power: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    trust_coefficient: float | None = None
    image_size: int | None = None
    num_classes: int | None = None
    augmentation: str = "minimal"
    workers: int = 2
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    memory_format: str = "auto"
    seed: int = 42
    out: str = "runs/train"
    checkpoint_every: int = 0
    keep: int = 3
    resume: bool = False
    log_every: int = 10
    timeline: str | None = None
    deterministic: bool = False
    measure_warmup_steps: int = DEFAULT_WARMUP_STEPS
    stall_timeout: float = 60.0
    eval: bool = True


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``larscale train`` (see RUN_FORMAT.md for what a run writes)."""
    d = TrainConfig()
    a = parser.add_argument
    a("--model", default=d.model, help="network from models/ (larscale models list), or 'tiny' (no-BN test net)")
    a("--framework", choices=FRAMEWORKS, default=d.framework)
    a("--dataset", default=d.dataset, help="synthetic (default), digits, or imagenet:PATH (train/ and val/)")
    batch = parser.add_argument_group("batch (global = per-rank × ranks × accumulation)")
    batch.add_argument("--global-batch", type=int, help="images per optimizer step over all ranks")
    batch.add_argument("--batch-per-rank", type=int, help=f"images per rank per micro-batch "
                       f"(default {DEFAULT_BATCH_PER_RANK} when --global-batch is not given)")
    batch.add_argument("--accumulation", type=int, default=d.accumulation, help="micro-batches per step")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS})")
    length.add_argument("--epochs", type=float, help="epochs of the training set (synthetic: 1,281,167 images)")
    opt = parser.add_argument_group("optimizer and learning rate")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    opt.add_argument("--lr", type=float, help="base (peak) LR; default 0.1·global_batch/256 unless --lr-preset")
    opt.add_argument("--lr-preset", action="store_true", help="the paper's LR, warm-up, weight decay for the "
                     "model and global batch (scaling.schedules.preset); explicit options override it")
    opt.add_argument("--warmup-steps", type=int, help="linear warm-up steps")
    opt.add_argument("--warmup-epochs", type=float, help="linear warm-up in epochs")
    opt.add_argument("--warmup-start-lr", type=float, help="LR at step 0 of the warm-up (default 0)")
    opt.add_argument("--end-lr", type=float, help="LR at the last step (default 0)")
    opt.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    opt.add_argument("--power", type=float, help="poly decay power (default 2)")
    opt.add_argument("--momentum", type=float, help="default 0.9")
    opt.add_argument("--weight-decay", type=float, help="default 5e-4, or the preset's")
    opt.add_argument("--trust-coefficient", type=float, help="LARS η (default 0.001, or the preset's)")
    data = parser.add_argument_group("data and model")
    data.add_argument("--image-size", type=int, help="input size (default: the model's; digits: 32)")
    data.add_argument("--num-classes", type=int, help="default: the dataset's (1000 synthetic, 10 digits)")
    data.add_argument("--augmentation", choices=("minimal", "extended"), default=d.augmentation)
    data.add_argument("--workers", type=int, default=d.workers, help="data loader processes per rank (imagenet)")
    dev = parser.add_argument_group("device")
    dev.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    dev.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=d.precision)
    dev.add_argument("--threads", type=int, help="threads per rank (default OMP_NUM_THREADS or cores ÷ local "
                     "ranks)")
    dev.add_argument("--memory-format", choices=("auto", "channels_last", "contiguous"), default=d.memory_format)
    dev.add_argument("--deterministic", action="store_true", help="deterministic kernels (bitwise resume)")
    run = parser.add_argument_group("run directory, checkpoints, logging")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--out", default=d.out, help="run directory (steps/, summary.json, checkpoints/)")
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                     help="checkpoint every N steps (0: only at the end and on SIGTERM/SIGUSR1)")
    run.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept (newest)")
    run.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    run.add_argument("--log-every", type=int, default=d.log_every, help="log line period when not on a terminal")
    run.add_argument("--timeline", help="write a Horovod Timeline (chrome://tracing JSON) to this file")
    run.add_argument("--measure-warmup-steps", type=int, default=d.measure_warmup_steps,
                     help="first steps (of this process) left out of the summary throughput")
    run.add_argument("--stall-timeout", type=float, default=d.stall_timeout,
                     help="seconds a rank may wait in a collective before it gives up (peer dead or hung)")
    run.add_argument("--no-eval", dest="eval", action="store_false", help="skip the top-1/top-5 evaluation")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f for f in TrainConfig.__dataclass_fields__}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def check_config(config: TrainConfig) -> None:
    """Checks that need no framework and no rank count; raise UsageError naming the option."""
    positive = {"accumulation": config.accumulation, "keep": config.keep, "log_every": config.log_every}
    for name in ("global_batch", "batch_per_rank", "steps", "image_size", "num_classes", "threads"):
        if getattr(config, name) is not None:
            positive[name] = getattr(config, name)
    for name, value in positive.items():
        if value < 1:
            raise usage_error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if config.epochs is not None and not config.epochs > 0:
        raise usage_error(f"--epochs must be > 0, got {config.epochs}")
    for name in ("checkpoint_every", "workers", "measure_warmup_steps"):
        if getattr(config, name) < 0:
            raise usage_error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if config.lr is not None and not config.lr > 0:
        raise usage_error(f"--lr must be > 0, got {config.lr}")
    if config.stall_timeout <= 0:
        raise usage_error(f"--stall-timeout must be > 0, got {config.stall_timeout}")
    if config.device == "cpu" and config.precision == "fp16":
        raise usage_error("--precision fp16 needs --device cuda; on CPU use bf16 or fp32")
    if config.warmup_steps is not None and config.warmup_epochs is not None:
        raise usage_error("give --warmup-steps or --warmup-epochs, not both")


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


# ---------------------------------------------------------------- signals and watchdog


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the handler only records the signal (safe at any point of the step)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def local(self) -> bool:
        return self.event.is_set()


class Watchdog:
    """Kills this rank when it has been blocked in one collective longer than its timeout.

    The main thread wraps every blocking collective in ``with watchdog.waiting("what", timeout)``. A peer that
    died or hangs leaves the others blocked there forever under launchers that do not tear the job down
    (``mpirun`` and ``horovodrun`` do; ``srun`` without ``--kill-on-bad-exit`` does not). Compute time is not
    watched, so a slow step is never mistaken for a dead peer.
    """

    def __init__(self, rank: int, on_expire: Callable[[str, float], None] | None = None) -> None:
        self.rank = rank
        self.on_expire = on_expire
        self._lock = threading.Lock()
        self._what: str | None = None
        self._deadline = math.inf
        self._since = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="larscale-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    @contextlib.contextmanager
    def waiting(self, what: str, timeout: float) -> Iterator[None]:
        now = time.monotonic()
        with self._lock:
            self._what, self._since, self._deadline = what, now, now + timeout
        try:
            yield
        finally:
            with self._lock:
                self._what, self._deadline = None, math.inf

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                what, since, expired = self._what, self._since, time.monotonic() > self._deadline
            if expired and what is not None:
                waited = time.monotonic() - since
                print(f"larscale train: rank {self.rank}: blocked {waited:.0f} s in {what}; a peer rank died or "
                      "hangs. Exiting.", file=sys.stderr, flush=True)
                if self.on_expire is not None:
                    with contextlib.suppress(Exception):
                        self.on_expire(what, waited)
                os._exit(EXIT_STALLED)

    def stop(self) -> None:
        self._stop.set()


# ---------------------------------------------------------------- run bookkeeping


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class StepTimes:
    """Per-step phase times of this process (since start or resume), kept for the summary."""

    step_s: list[float] = field(default_factory=list)
    data_s: list[float] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)
    allreduce_s: list[float] = field(default_factory=list)
    optimizer_s: list[float] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        for key in TIME_KEYS:
            getattr(self, key).append(float(record[key]))


@dataclass
class RankInfo:
    rank: int
    ranks: int
    local_rank: int
    local_size: int
    controller: str
    host: str = field(default_factory=socket.gethostname)


def build_summary(config: TrainConfig, plan: RunPlan, status: str, ranks: RankInfo, all_hosts: Sequence[str],
                  all_local_sizes: Sequence[int], all_times: Sequence[StepTimes], steps_done: int,
                  threads: int, versions: dict[str, str], started_at: str, checkpoint: str | None,
                  evaluation: dict[str, float] | None, dataset_name: str) -> dict[str, Any]:
    """The summary.json object (schema larscale.run/1) from every rank's step times.

    Step k's pace is the slowest rank's ``step_s`` (see larscale.runformat.throughput_ci); phase means are taken
    per rank over the measured steps and then averaged over ranks.
    """
    images_per_rank_step = plan.batch.batch_per_rank * plan.batch.accumulation
    n_common = min((len(t.step_s) for t in all_times), default=0)
    slowest = [max(t.step_s[k] for t in all_times) for k in range(n_common)]
    tp = throughput_ci(slowest, plan.batch.global_batch, config.measure_warmup_steps)
    skip = tp.warmup_steps_excluded

    def rank_mean(values: list[float]) -> float | None:
        measured = values[skip:]
        return sum(measured) / len(measured) if measured else None

    times: dict[str, float | None] = {}
    for key in TIME_KEYS:
        means = [m for m in (rank_mean(getattr(t, key)) for t in all_times) if m is not None]
        times[key] = sum(means) / len(means) if means else None
    per_rank = []
    if len(all_times) == ranks.ranks:  # a failure summary knows only rank 0's times: leave the list empty
        for t in all_times:
            m = rank_mean(t.step_s)
            per_rank.append(images_per_rank_step / m if m else 0.0)
    hosts = list(dict.fromkeys(all_hosts))
    summary = {
        "schema": SCHEMA,
        "status": status,
        "config": asdict(config),
        "model": config.model,
        "framework": config.framework,
        "dataset": dataset_name,
        "device": config.device,
        "precision": config.precision,
        "ranks": ranks.ranks,
        "ranks_per_node": max(all_local_sizes) if all_local_sizes else 1,
        "nodes": len(hosts),
        "hosts": hosts,
        "threads_per_rank": threads,
        "global_batch": plan.batch.global_batch,
        "batch_per_rank": plan.batch.batch_per_rank,
        "accumulation": plan.batch.accumulation,
        "steps_done": steps_done,
        "steps_planned": plan.total_steps,
        "steps_measured": tp.measured_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "warmup_steps_excluded": skip,
        "versions": versions,
        "controller": ranks.controller,
        "throughput": {"images_per_s": tp.images_per_s, "ci95_low": tp.ci95_low, "ci95_high": tp.ci95_high,
                       "per_rank_images_per_s": per_rank},
        "times": times,
        "totals": {
            "images": steps_done * plan.batch.global_batch,
            "wall_s_measured": sum(slowest[skip:]),
            "allreduce_fraction": (times["allreduce_s"] / times["step_s"])
            if times["allreduce_s"] is not None and times["step_s"] else None,
        },
        "lr": {"base_lr": plan.base_lr, "warmup_steps": plan.warmup_steps, "schedule": config.schedule,
               "weight_decay": plan.weight_decay, "trust_coefficient": plan.trust_coefficient},
        "image_size": plan.image_size,
        "num_classes": plan.num_classes,
        "eval": evaluation,
        "started_at": started_at,
        "finished_at": utc_now(),
        "checkpoint": checkpoint,
    }
    return dict(validate_summary(summary))


def write_summary(run_dir: str | os.PathLike, summary: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / "summary.json", summary)


def controller_name(hvd: Any) -> str:
    if hvd.size() == 1 and not any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                                                             "HOROVOD_RANK", "PMIX_RANK")):
        return "none"
    if hvd.mpi_enabled():
        return "mpi"
    if hvd.gloo_enabled():
        return "gloo"
    return "none"


def base_versions() -> dict[str, str]:
    import horovod

    return {"python": platform.python_version(), "horovod": horovod.__version__}


class Progress:
    """tqdm bar on rank 0 attached to a terminal; otherwise a plain line every ``every`` steps (rank 0)."""

    def __init__(self, rank: int, start: int, total: int, every: int) -> None:
        self.rank, self.every, self.total = rank, every, total
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.3g}",
                                 ips=f"{record['images_per_s'] * record['ranks']:.1f}")
            return
        step = record["step"] + 1
        if step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} epoch {record['epoch']} loss {record['loss']:.4f} "
                  f"lr {record['lr']:.4g} step {record['step_s'] * 1e3:.1f} ms (data {record['data_s'] * 1e3:.1f}"
                  f" compute {record['compute_s'] * 1e3:.1f} allreduce {record['allreduce_s'] * 1e3:.1f} "
                  f"optimizer {record['optimizer_s'] * 1e3:.1f}) ~{record['images_per_s'] * record['ranks']:.1f}"
                  " img/s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"larscale train: {message}", flush=True)


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


def set_horovod_env(config: TrainConfig) -> None:
    """Horovod reads these at hvd.init(): the Timeline file (rank 0 writes it)."""
    if config.timeline:
        Path(config.timeline).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        os.environ["HOROVOD_TIMELINE"] = str(Path(config.timeline).expanduser().resolve())

@dataclass
class RankStart:
    """What every rank has once Horovod, the backend, the watchdog and the stop flag are up."""

    info: RankInfo
    backend: Any
    watchdog: Watchdog
    hosts: list[str]            # per rank
    local_sizes: list[int]      # per rank: ranks on its node
    stop: StopFlag
    started_at: str
    startup_timeout: float


def start_rank(config: TrainConfig, hvd: Any, setup_backend: Callable[[RankInfo], Any]) -> RankStart:
    """The start-up both frameworks share; ``hvd`` is horovod.torch or horovod.tensorflow."""
    from scaling.backend import BackendError

    set_horovod_env(config)
    hvd.init()
    info = RankInfo(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), controller_name(hvd))
    started_at = utc_now()
    try:
        backend = setup_backend(info)
    except BackendError as err:
        raise usage_error(str(err)) from None
    watchdog = Watchdog(info.rank).start()
    # Hosts and ranks per node, gathered up front so even a failure summary describes the job; after the
    # backend set-up because TensorFlow fixes its thread pools at its first op.
    topology = hvd.allgather_object((info.host, info.local_size), name="larscale.topology")
    return RankStart(info, backend, watchdog, [t[0] for t in topology], [t[1] for t in topology],
                     StopFlag().install(), started_at, max(300.0, 5 * config.stall_timeout))



# ---------------------------------------------------------------- PyTorch


def torch_checkpoint_bytes(model: Any) -> int:
    """Lower bound of a checkpoint's size: the model's state plus one momentum buffer per parameter."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return state + sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def tiny_torch_model(num_classes: int) -> Any:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(32 * 4 * 4, num_classes))


def build_torch_model(name: str, num_classes: int, image_size: int) -> Any:
    if name == "tiny":
        return tiny_torch_model(num_classes)
    import models

    try:
        return models.get(name, framework="torch", num_classes=num_classes, image_size=image_size)
    except ValueError as err:
        raise usage_error(f"--model {name}: {err}") from None


def torch_param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weights (≥ 2-D) get weight decay and the LARS trust ratio; biases and BN parameters (1-D) neither, as in
    the MLPerf reference LARS."""
    weights = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    others = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": weights, "weight_decay": weight_decay, "lars": True}]
    if others:
        groups.append({"params": others, "weight_decay": 0.0, "lars": False})
    return groups


def make_torch_optimizer(config: TrainConfig, plan: RunPlan, model: Any) -> Any:
    import torch

    groups = torch_param_groups(model, plan.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=plan.base_lr, momentum=plan.momentum)
    from scaling.optim import LARS

    return LARS(groups, lr=plan.base_lr, momentum=plan.momentum, weight_decay=plan.weight_decay,
                trust_coefficient=plan.trust_coefficient)


class TorchData:
    """This rank's batches for one framework-neutral plan: ``micro_batches(step)`` yields (images, labels)."""

    def __init__(self, config: TrainConfig, plan: RunPlan, spec: Any, backend: Any, rank: int, ranks: int,
                 start_step: int) -> None:
        import torch

        from scaling import data

        self.config, self.plan, self.spec, self.backend = config, plan, spec, backend
        self.rank, self.ranks = rank, ranks
        self.kind = spec.kind
        b = plan.batch
        if self.kind == "synthetic":
            gen = torch.Generator(device="cpu").manual_seed(config.seed * 1_000_003 + rank)
            images = torch.randn(b.batch_per_rank, 3, plan.image_size, plan.image_size, generator=gen)
            labels = torch.randint(0, plan.num_classes, (b.batch_per_rank,), generator=gen)
            self.fixed = (backend.to_input(images), labels.to(backend.device))
            self.train_size = data.IMAGENET_TRAIN_IMAGES
        elif self.kind == "digits":
            arrays = data.load_digits(plan.image_size, config.seed)
            self.arrays = arrays
            self.train_x = torch.from_numpy(arrays.train_x).to(backend.device)
            self.train_y = torch.from_numpy(arrays.train_y).to(backend.device)
            self.train_size = len(arrays.train_y)
            self._perm_epoch, self._perm = -1, None
        else:
            self.train_set, self.val_set = data.imagenet_datasets(spec, plan.image_size, config.augmentation,
                                                                  config.seed)
            self.train_size = len(self.train_set)
            self._loader_epoch, self._loader_iter = -1, None
        self.start_step = start_step

    def micro_batches(self, step: int) -> Iterator[tuple[Any, Any]]:
        import torch

        from scaling import data

        b, spe = self.plan.batch, self.plan.steps_per_epoch
        epoch, position = divmod(step, spe)
        if self.kind == "synthetic":
            for _ in range(b.accumulation):
                yield self.fixed
        elif self.kind == "digits":
            if epoch != self._perm_epoch:
                self._perm = data.epoch_permutation(self.train_size, self.config.seed, epoch)
                self._perm_epoch = epoch
            for idx in data.rank_micro_batches(self._perm, position, b.global_batch, self.rank, b.batch_per_rank,
                                               b.accumulation):
                index = torch.from_numpy(idx).to(self.backend.device)
                yield self.backend.to_input(self.train_x.index_select(0, index)), self.train_y.index_select(0, index)
        else:
            if epoch != self._loader_epoch:
                self._loader_iter = iter(self._loader(epoch, position))
                self._loader_epoch = epoch
            for _ in range(b.accumulation):
                images, labels = next(self._loader_iter)
                yield self.backend.to_input(images), labels.to(self.backend.device, non_blocking=True)

    def _loader(self, epoch: int, start_position: int) -> Any:
        import torch

        from scaling import data

        b = self.plan.batch
        sampler = data.ShardBatchSampler(self.train_size, b.global_batch, b.batch_per_rank, b.accumulation,
                                         self.rank, self.config.seed, epoch, start_position)
        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=sampler, num_workers=self.config.workers,
            pin_memory=self.backend.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if self.config.workers > 0 else None)

    def eval_batches(self) -> Iterator[tuple[Any, Any]] | None:
        import torch

        from scaling import data

        size = max(1, self.plan.batch.batch_per_rank * 2)
        if self.kind == "digits":
            shard = data.eval_shard(len(self.arrays.test_y), self.rank, self.ranks)
            x, y = torch.from_numpy(self.arrays.test_x[shard]), torch.from_numpy(self.arrays.test_y[shard])
            return ((self.backend.to_input(x[i:i + size]), y[i:i + size].to(self.backend.device))
                    for i in range(0, len(y), size))
        if self.kind == "imagenet":
            shard = data.eval_shard(len(self.val_set), self.rank, self.ranks)
            keys = [[int(i) for i in shard[j:j + size]] for j in range(0, len(shard), size)]
            loader = torch.utils.data.DataLoader(self.val_set, batch_sampler=keys, num_workers=self.config.workers)
            return ((self.backend.to_input(x), y.to(self.backend.device)) for x, y in loader)
        return None


def torch_evaluate(model: Any, batches: Iterator[tuple[Any, Any]], backend: Any, hvd: Any,
                   watchdog: Watchdog, timeout: float) -> dict[str, float]:
    """Top-1 and top-5 accuracy over all ranks' shards (counts summed by an allreduce)."""
    import torch

    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for images, labels in batches:
            with backend.autocast():
                logits = model(images)
            k = min(5, logits.shape[1])
            top = logits.float().topk(k, dim=1).indices
            hit = top.eq(labels.view(-1, 1))
            counts += torch.tensor([hit[:, 0].sum().item(), hit.any(dim=1).sum().item(), len(labels)],
                                   dtype=torch.float64)
    model.train()
    with watchdog.waiting("evaluation allreduce", timeout):
        total = hvd.allreduce(counts, op=hvd.Sum, name="larscale.eval")
    n = max(total[2].item(), 1.0)
    return {"top1": total[0].item() / n, "top5": total[1].item() / n, "samples": int(total[2].item())}


def run_torch(config: TrainConfig) -> int:
    import horovod.torch as hvd
    import torch

    from larscale.runformat import StepLog
    from scaling import checkpoint as ckpt
    from scaling.backend import BackendError, require_cuda_torch, restore_rng_torch, rng_state_torch, setup_torch

    if config.device == "cuda":
        try:
            require_cuda_torch()
        except BackendError as err:
            raise usage_error(str(err)) from None
    spec, image_size, num_classes = dataset_facts(config)
    start = start_rank(config, hvd, lambda info: setup_torch(
        config.device, config.precision, config.threads, info.local_rank, info.local_size, config.memory_format,
        config.deterministic, config.seed))
    info, backend, watchdog, stop, started_at = start.info, start.backend, start.watchdog, start.stop, start.started_at
    rank, ranks = info.rank, info.ranks
    all_hosts, all_local_sizes, startup_timeout = start.hosts, start.local_sizes, start.startup_timeout

    # Model and optimizer: identical initial weights on every rank (same seed, and broadcast below anyway).
    torch.manual_seed(config.seed)
    # Parameters stay in the default (contiguous) layout even with channels-last: Horovod only reduces and
    # broadcasts contiguous tensors, and autograd keeps each gradient in its parameter's layout. NHWC inputs
    # alone make the convolutions run channels-last.
    model = build_torch_model(config.model, num_classes, image_size).to(backend.device)
    plan = make_plan(config, ranks, train_set_size(spec, config.seed), image_size, num_classes)
    # hvd.DistributedOptimizer returns a new optimizer object sharing the parameter groups but with its own
    # state: from here on only `optimizer` is used (state_dict, load_state_dict, broadcast).
    optimizer = hvd.DistributedOptimizer(make_torch_optimizer(config, plan, model),
                                         named_parameters=model.named_parameters(),
                                         backward_passes_per_step=plan.batch.accumulation, op=hvd.Average)

    # Resume: rank 0 reads the newest complete checkpoint and everything else is broadcast from it.
    start_step, resumed_from = 0, None
    state = None
    if config.resume and rank == 0:
        found = ckpt.latest(config.out, load=lambda f: torch.load(f, map_location="cpu", weights_only=False))
        if found is not None:
            resumed_from, state = str(found[0]), found[1]
    # Rank 0 writes the checkpoints: it checks now that they fit, and every rank stops together if not.
    refuse = None
    if rank == 0:
        refuse = ckpt.space_problem(config.out, torch_checkpoint_bytes(model), config.keep,
                                    checkpoints_planned(config.checkpoint_every, state["step"] if state else 0,
                                                        plan.total_steps))
    with watchdog.waiting("resume broadcast", startup_timeout):
        header = hvd.broadcast_object({"step": state["step"] if state else 0, "path": resumed_from,
                                       "rng": state.get("rng_per_rank") if state else None,
                                       "ranks": state["ranks"] if state else None, "refuse": refuse},
                                      root_rank=0, name="larscale.resume")
    if header["refuse"]:
        raise usage_error(f"--out {header['refuse']}")
    if config.resume and header["path"] is None:
        log(rank, f"--resume: no complete checkpoint in {config.out}/checkpoints; starting from step 0")
    start_step = header["step"]
    if state is not None:
        model.load_state_dict(state["model"])
    with watchdog.waiting("parameter broadcast", startup_timeout):
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        if header["path"] is not None:
            # The optimizer state travels pickled, not through hvd.broadcast_optimizer_state: that one sends
            # hyper-parameters (momentum, weight decay) as float32 tensors and rounds them, which breaks a
            # bitwise resume. A fresh start needs no broadcast: every rank builds the same empty state.
            restored = hvd.broadcast_object((state["optimizer"], state.get("scaler")) if state else None,
                                            root_rank=0, name="larscale.optimizer")
            optimizer.load_state_dict(restored[0])
            if restored[1] is not None and backend.scaler is not None:
                backend.scaler.load_state_dict(restored[1])
    if header["rng"] is not None and header["ranks"] == ranks:
        restore_rng_torch(header["rng"][rank])
    else:
        # Per-rank streams (dropout masks differ between ranks); the data order needs no RNG state.
        torch.manual_seed(config.seed * 1_000_003 + rank + 7919 * start_step)
        import random

        import numpy as np

        random.seed(config.seed + rank)
        np.random.seed((config.seed + rank) % 2**32)
    if start_step >= plan.total_steps:
        log(rank, f"nothing to do: the checkpoint is at step {start_step} of {plan.total_steps}")

    data_source = TorchData(config, plan, spec, backend, rank, ranks, start_step)
    step_log = StepLog(config.out, rank, keep_below=start_step if config.resume else None)
    criterion = torch.nn.CrossEntropyLoss()
    times = StepTimes()
    versions = {**base_versions(), "torch": torch.__version__}
    log(rank, f"{ranks} ranks ({info.controller}), model {config.model}, dataset {spec.name}, global batch "
        f"{plan.batch.global_batch} = {plan.batch.batch_per_rank} × {ranks} × {plan.batch.accumulation}, steps "
        f"{start_step}→{plan.total_steps}, {backend.threads} threads/rank, device {backend.device}, "
        f"{config.precision}{', channels-last' if backend.channels_last else ''}")

    def save_checkpoint(step: int) -> str | None:
        with watchdog.waiting("checkpoint RNG gather", config.stall_timeout):
            rng_states = hvd.allgather_object(rng_state_torch(), name="larscale.rng")
        path = None
        if rank == 0:
            payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scaler": backend.scaler.state_dict() if backend.scaler is not None else None,
                       "schedule_step": step, "epoch": step // plan.steps_per_epoch,
                       "position_in_epoch": step % plan.steps_per_epoch, "rng_per_rank": rng_states,
                       "ranks": ranks, "config": asdict(config), "lr_next": plan.lr_at(step)
                       if step < plan.total_steps else None}
            path = str(ckpt.save(config.out, step, payload, config.keep, dump=torch.save))
        return path

    def finish(status: str, step: int, checkpoint_path: str | None, evaluation: dict | None) -> None:
        with watchdog.waiting("summary gather", config.stall_timeout):
            gathered = hvd.allgather_object(times, name="larscale.summary")
        if rank == 0:
            summary = build_summary(config, plan, status, info, all_hosts, all_local_sizes, gathered, step,
                                    backend.threads, versions, started_at, checkpoint_path, evaluation, spec.name)
            summary["backend"] = {"threads_per_rank": backend.threads, "channels_last": backend.channels_last,
                                  "device": str(backend.device), **backend.details,
                                  "nccl": bool(hvd.nccl_built())}
            summary["resumed_from"] = resumed_from
            write_summary(config.out, summary)

    step = start_step
    progress = Progress(rank, start_step, plan.total_steps, config.log_every)
    flag_pending = None
    last_checkpoint = None
    status = "failed"
    timer = time.perf_counter
    try:
        boundary = timer()
        while step < plan.total_steps:
            epoch = step // plan.steps_per_epoch
            lr = plan.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            data_s = compute_s = 0.0
            loss_sum = 0.0
            t = timer()
            batches = data_source.micro_batches(step)
            for _ in range(plan.batch.accumulation):
                images, labels = next(batches)
                backend.synchronize()
                t_data = timer()
                data_s += t_data - t
                with backend.autocast():
                    loss = criterion(model(images), labels)
                scaled = loss / plan.batch.accumulation
                (backend.scaler.scale(scaled) if backend.scaler is not None else scaled).backward()
                loss_sum += loss.item()  # also waits for the GPU: compute is measured finished
                t = timer()
                compute_s += t - t_data
            with watchdog.waiting("gradient allreduce", config.stall_timeout):
                optimizer.synchronize()
            backend.synchronize()
            t_reduced = timer()
            if backend.scaler is not None:
                backend.scaler.unscale_(optimizer)
            with optimizer.skip_synchronize():
                if backend.scaler is not None:
                    backend.scaler.step(optimizer)
                    backend.scaler.update()
                else:
                    optimizer.step()
            optimizer.zero_grad()
            backend.synchronize()
            t_done = timer()
            step += 1
            # Stop agreement: the flags summed at the previous boundary decide now; a new sum starts now and
            # overlaps the next step.
            agreed_stop = False
            if flag_pending is not None:
                with watchdog.waiting("stop-flag allreduce", config.stall_timeout):
                    agreed_stop = hvd.synchronize(flag_pending).item() > 0
            flag_pending = hvd.allreduce_async(torch.tensor([1.0 if stop.local else 0.0]), op=hvd.Sum,
                                               name="larscale.stop")
            now = timer()
            record = {
                "step": step - 1, "epoch": epoch, "rank": rank, "ranks": ranks,
                "batch_per_rank": plan.batch.batch_per_rank, "global_batch": plan.batch.global_batch,
                "data_s": data_s, "compute_s": compute_s, "allreduce_s": t_reduced - t,
                "optimizer_s": t_done - t_reduced, "step_s": now - boundary,
                "images_per_s": plan.batch.batch_per_rank * plan.batch.accumulation / (now - boundary),
                "lr": lr, "loss": loss_sum / plan.batch.accumulation, "time": time.time(),
            }
            step_log.write(record)
            times.add(record)
            progress.update(record)
            if agreed_stop:
                raise StopRequested
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < plan.total_steps:
                last_checkpoint = save_checkpoint(step) or last_checkpoint
            boundary = timer()
        if flag_pending is not None:
            hvd.synchronize(flag_pending)
            flag_pending = None
        last_checkpoint = save_checkpoint(step) or last_checkpoint
        evaluation = None
        if config.eval:
            batches = data_source.eval_batches()
            if batches is not None:
                evaluation = torch_evaluate(model, batches, backend, hvd, watchdog, config.stall_timeout)
                log(rank, f"eval: top-1 {evaluation['top1']:.4f} top-5 {evaluation['top5']:.4f} "
                    f"({evaluation['samples']} images)")
                evaluation = {"top1": evaluation["top1"], "top5": evaluation["top5"]}
        status = "complete"
        finish(status, step, last_checkpoint, evaluation)
        progress.close()
        log(rank, f"complete: {step} steps; summary {Path(config.out) / 'summary.json'}")
        return 0
    except StopRequested:
        progress.close()
        if flag_pending is not None:
            hvd.synchronize(flag_pending)
        last_checkpoint = save_checkpoint(step) or last_checkpoint
        status = "interrupted"
        finish(status, step, last_checkpoint, None)
        # Everyone waits until rank 0 wrote the checkpoint and summary: a launcher may kill the job as soon
        # as the first rank exits non-zero.
        with watchdog.waiting("final barrier", config.stall_timeout):
            hvd.allreduce(torch.zeros(1), name="larscale.barrier")
        log(rank, f"stopped by {stop.signal_name or 'a signal on another rank'} at step {step}; checkpoint "
            f"{last_checkpoint}; resume with --resume (exit {EXIT_RESUMABLE})")
        return EXIT_RESUMABLE
    except Exception as err:
        progress.close()
        if not isinstance(err, ckpt.CheckpointWriteError):  # that one's message says it all
            traceback.print_exc()
        print(f"larscale train: rank {rank}: failed at step {step}: {type(err).__name__}: {err}", file=sys.stderr,
              flush=True)
        if rank == 0:
            with contextlib.suppress(Exception):
                failed = build_summary(config, plan, "failed", info, all_hosts, all_local_sizes, [times], step,
                                       backend.threads, versions, started_at, last_checkpoint, None, spec.name)
                write_summary(config.out, failed)
        return EXIT_FAILED
    finally:
        step_log.close()
        stop.restore()
        watchdog.stop()


# ---------------------------------------------------------------- entry points


def run(args: argparse.Namespace) -> int:
    """Handler of ``larscale train``: validate, then run the chosen framework. Returns the exit status."""
    config = config_from_args(args)
    check_config(config)
    check_output_dir(config.out)
    if config.framework == "tensorflow":
        from scaling.train_tf import run_tensorflow

        return run_tensorflow(config)
    return run_torch(config)


def build_parser(prog: str = "python -m scaling.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    return add_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    from larscale import UsageError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        print(f"larscale train: error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
