"""The sweep spec: one YAML document describing an experiment, validated strictly.

The dataclasses below *are* the schema (loaded by :func:`larscale.schema.from_mapping`), so every error names
its field by path (``sweep.nodes[2]: must be > 0, got 0``) and never surfaces as a traceback. Example::

    name: alexnet-strong
    model: alexnet_bn
    framework: torch
    dataset: synthetic
    machine: stampede2-skx          # bundled profile name or a path to a profile YAML
    sweep:
      kind: strong                  # strong: fixed global batch | weak: fixed per-rank batch | grid: nodes x batch
      nodes: {start: 1, stop: 64, factor: 2}     # or a list: [1, 2, 4, 8]
      global_batch: 8192
      ranks_per_node: 2             # default: the profile's
      threads_per_rank: 24
    training: {steps: 200, optimizer: lars, lr: 2.0, lr_scaling: linear, base_batch: 512}
    repetitions: 2
    job: {account: A-ccsc, walltime_margin: 1.5, pack: false}

Which points a spec expands to, and what needs the machine profile (ranks, queue limits), is jobs/sweep.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from larscale import backends
from larscale.machine import Container, walltime_seconds
from larscale.schema import SchemaError, check, from_mapping, load_yaml, positive, to_mapping

# Names that end up in job names, file names and scheduler directives: no shell or directive metacharacters.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DATASET = re.compile(r"^(synthetic|digits|imagenet:.+)$", re.DOTALL)
# Used when the models registry is not importable (it is the fixed list of the models contract).
KNOWN_MODELS = ("alexnet", "alexnet_bn", "resnet50", "resnet50_v1", "googlenet", "vgg16")
# Networks the trainer defines itself for tests (scaling/train.py LOCAL_MODELS).
TRAINER_MODELS = ("tiny",)


def _safe_name(value: str) -> str | None:
    return None if SAFE_NAME.match(value) else (
        f"use letters, digits, '.', '_' and '-' only (at most 64, starting with a letter or digit), got {value!r}")


def _walltime(value: str) -> str | None:
    try:
        return None if walltime_seconds(value) > 0 else "must be longer than 0 s"
    except ValueError as err:
        return str(err)


def _at_least_one(value: float) -> str | None:
    return None if value >= 1 else f"must be >= 1 (a margin multiplies the prediction), got {value!r}"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value!r}"


def model_names() -> list[str]:
    """The registry's model names (``models.names()``, or the contract's fixed list when it is absent), plus
    the trainer's own small test network ``tiny``."""
    try:
        import models

        names = list(models.names())
    except (ImportError, AttributeError):
        names = []
    return [*(names or KNOWN_MODELS), *TRAINER_MODELS]


@dataclass(frozen=True)
class NodeRange:
    """Geometric range of node counts: start, start·factor, start·factor², … while ≤ stop."""

    start: int = check(positive)
    stop: int = check(positive)
    factor: int = check(lambda v: None if v >= 2 else f"must be >= 2, got {v!r}", default=2)

    def values(self) -> list[int]:
        out, n = [], self.start
        while n <= self.stop:
            out.append(n)
            n *= self.factor
        return out


def _positive_int_list(value: Any, name: str, max_len: int = 4096) -> list[int]:
    if not isinstance(value, list):
        raise SchemaError(name, f"expected a list of integers, got {type(value).__name__} {value!r}")
    if not value:
        raise SchemaError(name, "must not be empty")
    if len(value) > max_len:
        raise SchemaError(name, f"at most {max_len} entries, got {len(value)}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise SchemaError(f"{name}[{i}]", f"expected an integer, got {v!r}")
        if v <= 0:
            raise SchemaError(f"{name}[{i}]", f"must be > 0, got {v!r}")
        if v in value[:i]:
            raise SchemaError(f"{name}[{i}]", f"{v} is listed twice")
    return list(value)


@dataclass(frozen=True)
class Sweep:
    kind: Literal["strong", "weak", "grid"]
    # A list of node counts or a geometric range mapping {start, stop, factor}; checked in __post_init__ so
    # that errors point at the offending element (``nodes[2]``).
    nodes: Any
    # One count or a list to sweep over (nodes × ranks_per_node); default: the profile's.
    ranks_per_node: Any = None
    # Cores per rank (--cpus-per-task, OMP_NUM_THREADS). Default: 1 on CPU profiles; on GPU profiles the node's
    # cores divided among its ranks.
    threads_per_rank: int | None = check(positive, default=None)
    global_batch: int | None = check(positive, default=None)       # strong
    batch_per_rank: int | None = check(positive, default=None)     # weak
    global_batches: list[int] | None = None                        # grid

    def __post_init__(self) -> None:
        if isinstance(self.nodes, dict):
            node_range = from_mapping(NodeRange, self.nodes, "nodes")
            if node_range.stop < node_range.start:
                raise SchemaError("nodes.stop", f"must be >= start ({node_range.start}), got {node_range.stop}")
            if len(node_range.values()) > 64:
                raise SchemaError("nodes", "the range gives more than 64 node counts")
            object.__setattr__(self, "nodes", node_range.values())
        else:
            object.__setattr__(self, "nodes", _positive_int_list(self.nodes, "nodes", 64))
        if self.ranks_per_node is not None:
            value = self.ranks_per_node
            if isinstance(value, int) and not isinstance(value, bool):
                if value <= 0:
                    raise SchemaError("ranks_per_node", f"must be > 0, got {value!r}")
                value = [value]
            object.__setattr__(self, "ranks_per_node", _positive_int_list(value, "ranks_per_node", 16))
        needs = {"strong": "global_batch", "weak": "batch_per_rank", "grid": "global_batches"}[self.kind]
        if getattr(self, needs) is None:
            raise SchemaError(needs, f"required for a {self.kind} sweep")
        for name in ("global_batch", "batch_per_rank", "global_batches"):
            if name != needs and getattr(self, name) is not None:
                raise SchemaError(name, f"not used by a {self.kind} sweep (it takes {needs})")
        if self.global_batches is not None:
            _positive_int_list(self.global_batches, "global_batches", 64)


@dataclass(frozen=True)
class Training:
    """What each run trains; turned into ``python -m scaling.train`` options (see jobs/sweep.py)."""

    steps: int | None = check(positive, default=None)
    epochs: float | None = check(positive, default=None)
    optimizer: Literal["lars", "sgd"] = "lars"
    lr: float | None = check(positive, default=None)
    lr_preset: bool = False
    # Scaling rule from a reference batch: lr · (global_batch / base_batch)^p, p = 1 (linear) or ½ (sqrt).
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    base_batch: int = check(positive, default=256)
    warmup_steps: int | None = check(_non_negative, default=None)
    warmup_epochs: float | None = check(_non_negative, default=None)
    end_lr: float | None = check(_non_negative, default=None)
    schedule: Literal["poly", "step", "cosine"] | None = None
    accumulation: int | None = check(positive, default=None)
    image_size: int | None = check(positive, default=None)
    num_classes: int | None = check(positive, default=None)
    device: Literal["cpu", "cuda"] | None = None   # default: from the profile's device kind
    # Default: bf16 on a GPU whose profile lists a bf16 peak, else fp32.
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    # Data loader processes per rank (trainer --workers). Default: on GPU profiles the rank's cores but one (the
    # training loop's), else the trainer's own default.
    workers: int | None = check(_non_negative, default=None)
    seed: int = check(_non_negative, default=0)
    checkpoint_every: int | None = check(positive, default=None)
    keep: int | None = check(positive, default=None)
    log_every: int | None = check(positive, default=None)
    # Further trainer options, passed through as separate (quoted) arguments.
    extra_args: list[str] = field(default_factory=list)
    # How ranks talk: Horovod (the default) or PyTorch's own torch.distributed (DDP; PyTorch only). Which
    # launchers can start each one is checked against the machine in jobs/scripts.py (check_launch).
    backend: Literal["horovod", "ddp"] = "horovod"

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise SchemaError("steps", "give exactly one of steps and epochs")
        if self.lr_preset and self.lr is not None:
            raise SchemaError("lr_preset", "lr_preset takes the paper's learning rate: do not also give lr")
        if self.lr_scaling != "none" and self.lr is None:
            raise SchemaError("lr_scaling", "a scaling rule needs the reference lr (training.lr)")
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise SchemaError("warmup_steps", "give warmup_steps or warmup_epochs, not both")
        for i, arg in enumerate(self.extra_args):
            if "\0" in arg:
                raise SchemaError(f"extra_args[{i}]", "must not contain a NUL byte")


@dataclass(frozen=True)
class JobOptions:
    """How points become scheduler jobs."""

    # The user's walltime per point; otherwise (prediction + startup_s) · walltime_margin.
    walltime: str | None = check(_walltime, default=None)
    walltime_margin: float = check(_at_least_one, default=1.5)
    startup_s: float = check(_non_negative, default=120.0)
    account: str | None = check(_safe_name, default=None)
    partition: str | None = check(_safe_name, default=None)
    qos: str | None = check(_safe_name, default=None)
    # Seconds before the walltime at which the trainer is told (SIGUSR1) to checkpoint and stop.
    signal_s: int = check(positive, default=120)
    # Run small points one after another inside one allocation (same node count), up to pack_walltime
    # (default: the queue's max walltime) per job.
    pack: bool = False
    pack_walltime: str | None = check(_walltime, default=None)
    # PBS resource syntax: PBS Pro "select" chunks or Torque "nodes=N:ppn=R".
    pbs_resources: Literal["select", "nodes"] = "select"
    # Extra environment for the runs; names must be shell identifiers, values are quoted.
    env: dict[str, str] = field(default_factory=dict)
    # The interpreter on the cluster (default: the one running larscale), or an argument list that starts it
    # (["conda", "run", "-n", "ml", "python"]).
    python: str | list[str] | None = None
    # Launcher for the ranks (default: the profile's); one of jobs/launchers.py's. torchrun starts one agent per
    # node for training.backend: ddp (jobs/scripts.py says which combinations work).
    launcher: str | None = None
    # GPUs per node to request (default on GPU profiles: one per rank).
    gpus_per_node: int | None = check(_non_negative, default=None)
    # Scheduler options written among the directives after the profile's (jobs/schedulers/ validates them).
    site_lines: list[str] = field(default_factory=list)
    # A container for the ranks (overrides the profile's); "none" runs without the profile's container.
    container: Any = None      # a Container mapping, "none" or unset (checked in __post_init__)
    # Submit each job this many times, each to start after the one before ends (any exit) and resume from its
    # last checkpoint: a run longer than the queue's walltime as a chain of jobs.
    chain: int = check(lambda v: None if 1 <= v <= 100 else f"must be 1..100, got {v!r}", default=1)
    # A point whose run fails (a rank died or hung: any exit but 0, 2 usage error, 75 stopped at the walltime)
    # is relaunched with --resume inside the same allocation up to this many times, after retry_backoff_s.
    max_retries: int = check(_non_negative, default=2)
    # Seconds between a failed attempt and the next: lets the launcher and the nodes release the dead ranks'
    # ports, shared memory and devices before the next ranks start.
    retry_backoff_s: float = check(_non_negative, default=5.0)

    def __post_init__(self) -> None:
        for name, value in self.env.items():
            if not ENV_NAME.match(name):
                raise SchemaError(f"env.{name}", "environment names are letters, digits and '_', not starting "
                                  "with a digit")
            if "\0" in value:
                raise SchemaError(f"env.{name}", "must not contain a NUL byte")
        words = [self.python] if isinstance(self.python, str) else (self.python or [])
        if self.python is not None and (not words or any(not w or "\0" in w for w in words)):
            raise SchemaError("python", "must be a non-empty path (or list of words) without NUL bytes")
        if isinstance(self.container, dict):
            object.__setattr__(self, "container", from_mapping(Container, self.container, "container"))
        elif self.container not in (None, "none") and not isinstance(self.container, Container):
            raise SchemaError("container", f"expected a mapping (runtime, image, binds) or 'none', got "
                              f"{self.container!r}")
        if self.launcher is not None and not re.match(r"^[a-z][a-z0-9_-]*$", self.launcher):
            raise SchemaError("launcher", f"a launcher name (srun, mpirun, ...), got {self.launcher!r}")


@dataclass(frozen=True)
class SweepSpec:
    name: str = check(_safe_name)
    model: str
    machine: str
    sweep: Sweep
    training: Training
    framework: Literal["torch", "tensorflow"] = "torch"
    dataset: str = check(lambda v: None if DATASET.match(v) else
                         f"must be synthetic, digits or imagenet:PATH, got {v!r}", default="synthetic")
    repetitions: int = check(positive, default=1)
    job: JobOptions = field(default_factory=JobOptions)
    # Where manifest, scripts, logs and run directories go (default: runs/<name>).
    output: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        names = model_names()
        if self.model not in names:
            raise SchemaError("model", f"unknown model {self.model!r}; known: {', '.join(names)}")
        if "\0" in self.dataset:
            raise SchemaError("dataset", "must not contain a NUL byte")
        if self.output is not None and (not self.output or "\0" in self.output):
            raise SchemaError("output", "must be a non-empty path without NUL bytes")
        if self.repetitions > 100:
            raise SchemaError("repetitions", f"at most 100, got {self.repetitions}")
        backend = self.training.backend
        if not backends.trains(backend, self.framework):
            raise SchemaError("training.backend", f"{backend} ({backends.BACKENDS[backend].title}) trains "
                              f"{backends.frameworks_title(backend)} models only; framework is {self.framework!r}: "
                              f"use backend {' or '.join(backends.backends_for(self.framework))}")
        needed = backends.LAUNCHER_BACKENDS.get(self.job.launcher or "")
        if needed and backend not in needed:
            raise SchemaError("job.launcher", f"{self.job.launcher} starts "
                              f"{' or '.join(backends.BACKENDS[b].title for b in needed)} workers only: it needs "
                              f"training.backend: {' or '.join(needed)}")

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)


def parse_spec(data: Any, source: str | None = None) -> SweepSpec:
    """A validated spec from a mapping; SchemaError (a ValueError) names the field and the reason."""
    try:
        return from_mapping(SweepSpec, data)
    except SchemaError as err:
        # A mistyped key can hold a newline or control character: escape it so the error stays one line.
        path = err.path if err.path.isprintable() else err.path.encode("unicode_escape").decode()
        reason = err.reason if err.reason.isprintable() else err.reason.encode("unicode_escape").decode()
        raise SchemaError(path, reason, source) from None
    except RecursionError:
        raise SchemaError("", "document nested too deeply", source) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec YAML file."""
    return parse_spec(load_yaml(Path(path)), str(path))
