"""The options of ``larscale train``: one dataclass, its command line, and the checks that need no rank count.

Everything here is standard library: ``larscale --help`` and the job scripts' argument builders import it without
loading torch, TensorFlow or Horovod.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from larscale import backends, errors_once
from larscale.runformat import DEFAULT_WARMUP_STEPS

FRAMEWORKS = ("torch", "tensorflow")
# How gradients are averaged, and which frameworks each backend trains: larscale/backends.py.
BACKENDS = tuple(backends.BACKENDS)
OPTIMIZERS = ("lars", "sgd")
SCHEDULES = ("poly", "step", "cosine")
# PyTorch's kernels on CPU: its own choices, or faster ones that round differently (scaling/framework_torch.py).
CPU_KERNELS = ("default", "fast")
DEFAULT_BATCH_PER_RANK = 32
DEFAULT_STEPS = 100
# Trainer-local diagnostic network (not in models/): 2 conv + linear, no BatchNorm and no dropout, so a step
# on 2 ranks × b equals a step on 1 rank × 2b exactly up to rounding (BN would use per-rank batch statistics).
LOCAL_MODELS = ("tiny",)


def usage_error(message: str, every_rank: bool = False) -> Exception:
    """The user's mistake: one line naming the option (exit 2), never retried by the job scripts.

    Printed by rank 0 only (every rank finds the same mistake), unless ``every_rank``: a problem of this rank alone
    (no GPU for its local rank), which no other rank would report.
    """
    from larscale import UsageError

    error = UsageError(message)
    error.every_rank = every_rank  # type: ignore[attr-defined]
    return error


@dataclass
class TrainConfig:
    """Every option of a run; written verbatim into summary.json["config"] and into checkpoints."""

    model: str = "resnet50"
    framework: str = "torch"
    backend: str = "horovod"
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
    compile: bool = False
    cpu_kernels: str = "default"
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
    final_checkpoint: bool = True


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``larscale train`` (see larscale/RUN_FORMAT.md for what a run writes)."""
    errors_once(parser)
    d = TrainConfig()
    a = parser.add_argument
    a("--model", default=d.model, help="network from models/ (larscale models list), or 'tiny' (no-BN test net)")
    a("--framework", choices=FRAMEWORKS, default=d.framework)
    a("--backend", choices=BACKENDS, default=d.backend,
      help="gradient averaging: horovod (default; mpirun/srun/horovodrun) or ddp (PyTorch DistributedDataParallel; "
      "torchrun/srun/mpirun, rendezvous at MASTER_ADDR:MASTER_PORT or through MPI)")
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
    dev.add_argument("--compile", action="store_true", help="torch.compile the model (PyTorch; needs a C++ "
                     "compiler on CPU, Triton on GPU); the summary says whether allreduces still overlapped backward")
    dev.add_argument("--cpu-kernels", choices=CPU_KERNELS, default=d.cpu_kernels,
                     help="PyTorch on CPU: 'fast' runs on oneDNN the 1x1 convolutions PyTorch gives its slower GEMM "
                     "path (1 thread, under 16 images), and --optimizer sgd as one fused pass; results differ from "
                     "'default' by rounding")
    dev.add_argument("--deterministic", action="store_true", help="deterministic kernels (bitwise resume)")
    run = parser.add_argument_group("run directory, checkpoints, logging")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--out", default=d.out, help="run directory (steps/, summary.json, checkpoints/)")
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                     help="checkpoint every N steps (0: only at the end and on SIGTERM/SIGUSR1)")
    run.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept (newest)")
    run.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out "
                     "(implied when torchrun restarts the workers)")
    run.add_argument("--log-every", type=int, default=d.log_every, help="log line period when not on a terminal")
    run.add_argument("--timeline", help="write a Horovod Timeline (chrome://tracing JSON) to this file")
    run.add_argument("--measure-warmup-steps", type=int, default=d.measure_warmup_steps,
                     help="first steps (of this process) left out of the summary throughput")
    run.add_argument("--stall-timeout", type=float, default=d.stall_timeout,
                     help="seconds a rank may wait in a collective before it gives up (peer dead or hung)")
    run.add_argument("--no-eval", dest="eval", action="store_false", help="skip the top-1/top-5 evaluation")
    run.add_argument("--no-final-checkpoint", dest="final_checkpoint", action="store_false",
                     help="a complete run writes no checkpoint at its end (benchmark and calibration runs, whose "
                     "logs are what counts); a stop by signal still writes one, so the run can resume")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = set(TrainConfig.__dataclass_fields__)
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
    if config.backend in BACKENDS and config.framework in FRAMEWORKS \
            and not backends.trains(config.backend, config.framework):
        raise usage_error(f"--backend {config.backend} is {backends.BACKENDS[config.backend].title}; "
                          f"{backends.FRAMEWORK_TITLES[config.framework]} runs use --backend "
                          f"{' or '.join(backends.backends_for(config.framework))}")
    if config.cpu_kernels != "default" and (config.framework != "torch" or config.device != "cpu"):
        raise usage_error(f"--cpu-kernels {config.cpu_kernels} chooses PyTorch's CPU kernels; drop it for "
                          "TensorFlow or --device cuda")
    if config.compile and config.framework != "torch":
        raise usage_error("--compile is torch.compile (PyTorch); TensorFlow already compiles its steps with "
                          "tf.function")
    if config.timeline and config.backend != "horovod":
        raise usage_error("--timeline writes a Horovod Timeline; with --backend ddp use the PyTorch profiler")
