"""The run directory's measurement files: per-rank step logs, the run summary, and their validators.

Pure Python on purpose (no torch, tensorflow or numpy at module level): ``jobs/`` and ``analysis/`` import
this module to read and check what a training run wrote. The schema is documented in larscale/RUN_FORMAT.md.

Throughput statistics
---------------------
Let ``t_1 .. t_n`` be the step times of the measured steps (the first ``W`` steps are warm-up and are left
out), where ``t_k`` is the slowest rank's time for step k (ranks wait for each other in the allreduce, so
the slowest rank sets the pace). With ``G`` images per global step the run's throughput is the ratio
estimator ``X = G / mean(t)`` images/s. Its 95 % confidence interval comes from the Student-t interval of the
mean step time, ``mean(t) ± q · s / sqrt(n)`` with ``q`` the 0.975 quantile of t with ``n − 1`` degrees of
freedom, mapped through ``G / ·`` (monotone, so the interval bounds swap): ``[G / (mean + h), G / (mean − h)]``.
Steps are treated as independent samples; consecutive step times are mildly correlated in practice, so the
interval is a little optimistic.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = "larscale.run/1"
# A sweep directory's manifest (written by jobs/manifest.py, read by analysis/sweepdirs.py).
SWEEP_MANIFEST = "manifest.json"
SWEEP_SCHEMA = "larscale.sweep/1"
STATUSES = ("complete", "interrupted", "failed")
# Who moved the gradients: Horovod's controllers (mpi, gloo) or torch.distributed's process group (gloo, nccl).
CONTROLLERS = ("mpi", "gloo", "nccl", "none")
COMMUNICATIONS = ("horovod", "ddp")
# Warm-up steps left out of the summary throughput unless the run is shorter (see summarize_steps).
DEFAULT_WARMUP_STEPS = 5
# Exit statuses of `larscale train` (every rank), read by the job scripts and `sweep collect`.
EXIT_COMPLETE = 0
EXIT_FAILED = 1      # a rank failed (exception, lost peer seen by the launcher); resumable from the last checkpoint
EXIT_USAGE = 2       # a bad option or input, reported before any training: never worth retrying
EXIT_STALLED = 70    # EX_SOFTWARE: the watchdog saw a collective blocked past --stall-timeout (a peer died or hangs)
EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after writing a checkpoint

_NUM = (int, float)
# key -> (accepted types, lower bound or None). bool is rejected separately (it is an int subclass).
STEP_FIELDS: dict[str, tuple[tuple[type, ...], float | None]] = {
    "step": ((int,), 0),
    "epoch": ((int,), 0),
    "rank": ((int,), 0),
    "ranks": ((int,), 1),
    "batch_per_rank": ((int,), 1),
    "global_batch": ((int,), 1),
    "data_s": (_NUM, 0.0),
    "compute_s": (_NUM, 0.0),
    "allreduce_s": (_NUM, 0.0),
    "optimizer_s": (_NUM, 0.0),
    "step_s": (_NUM, 0.0),
    "images_per_s": (_NUM, 0.0),
    "lr": (_NUM, None),
    "loss": (_NUM, None),
    "time": (_NUM, 0.0),
}
TIME_KEYS = ("step_s", "data_s", "compute_s", "allreduce_s", "optimizer_s")
SUMMARY_FIELDS: dict[str, tuple[type, ...]] = {
    "schema": (str,),
    "status": (str,),
    "config": (dict,),
    "model": (str,),
    "framework": (str,),
    "dataset": (str,),
    "device": (str,),
    "precision": (str,),
    "ranks": (int,),
    "ranks_per_node": (int,),
    "nodes": (int,),
    "hosts": (list,),
    "threads_per_rank": (int,),
    "global_batch": (int,),
    "batch_per_rank": (int,),
    "steps_done": (int,),
    "steps_planned": (int,),
    "warmup_steps_excluded": (int,),
    "versions": (dict,),
    "controller": (str,),
    "throughput": (dict,),
    "times": (dict,),
    "eval": (dict, type(None)),
    "started_at": (str,),
    "finished_at": (str,),
    "checkpoint": (str, type(None)),
}


class RunFormatError(ValueError):
    """A step record or summary that does not follow RUN_FORMAT.md; the message names the field."""


def _check_number(where: str, key: str, value: Any, types: tuple[type, ...], low: float | None) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        raise RunFormatError(f"{where}: {key!r} must be {'/'.join(t.__name__ for t in types)}, "
                             f"got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value) and key != "loss":
        raise RunFormatError(f"{where}: {key!r} must be finite, got {value!r}")
    if low is not None and value < low:
        raise RunFormatError(f"{where}: {key!r} must be >= {low}, got {value!r}")


def validate_step(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """Check one step-log record (one JSON line); return it unchanged or raise RunFormatError."""
    if not isinstance(record, Mapping):
        raise RunFormatError(f"step record must be an object, got {type(record).__name__}")
    missing = [k for k in STEP_FIELDS if k not in record]
    if missing:
        raise RunFormatError(f"step record lacks {', '.join(missing)}")
    where = f"step {record.get('step')!r} rank {record.get('rank')!r}"
    for key, (types, low) in STEP_FIELDS.items():
        _check_number(where, key, record[key], types, low)
    if record["rank"] >= record["ranks"]:
        raise RunFormatError(f"{where}: rank {record['rank']} not below ranks {record['ranks']}")
    if record["global_batch"] % (record["batch_per_rank"] * record["ranks"]):
        raise RunFormatError(f"{where}: global_batch {record['global_batch']} is not a multiple of "
                             f"batch_per_rank × ranks = {record['batch_per_rank'] * record['ranks']}")
    return record


def validate_summary(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    """Check a run summary (summary.json); return it unchanged or raise RunFormatError."""
    if not isinstance(summary, Mapping):
        raise RunFormatError(f"summary must be an object, got {type(summary).__name__}")
    missing = [k for k in SUMMARY_FIELDS if k not in summary]
    if missing:
        raise RunFormatError(f"summary lacks {', '.join(missing)}")
    for key, types in SUMMARY_FIELDS.items():
        value = summary[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise RunFormatError(f"summary: {key!r} must be {'/'.join(t.__name__ for t in types)}, "
                                 f"got {type(value).__name__}")
    if summary["schema"] != SCHEMA:
        raise RunFormatError(f"summary: schema must be {SCHEMA!r}, got {summary['schema']!r}")
    if summary["status"] not in STATUSES:
        raise RunFormatError(f"summary: status must be one of {STATUSES}, got {summary['status']!r}")
    if summary["controller"] not in CONTROLLERS:
        raise RunFormatError(f"summary: controller must be one of {CONTROLLERS}, got {summary['controller']!r}")
    for key in ("ranks", "ranks_per_node", "nodes", "threads_per_rank", "global_batch", "batch_per_rank"):
        if summary[key] < 1:
            raise RunFormatError(f"summary: {key!r} must be >= 1, got {summary[key]}")
    for key in ("steps_done", "steps_planned", "warmup_steps_excluded"):
        if summary[key] < 0:
            raise RunFormatError(f"summary: {key!r} must be >= 0, got {summary[key]}")
    if summary["nodes"] * summary["ranks_per_node"] < summary["ranks"]:
        raise RunFormatError(f"summary: nodes × ranks_per_node = {summary['nodes'] * summary['ranks_per_node']}"
                             f" < ranks = {summary['ranks']}")
    if len(summary["hosts"]) != summary["nodes"] or not all(isinstance(h, str) for h in summary["hosts"]):
        raise RunFormatError(f"summary: hosts must be {summary['nodes']} host names, got {summary['hosts']!r}")
    if summary["global_batch"] % (summary["batch_per_rank"] * summary["ranks"]):
        raise RunFormatError("summary: global_batch is not a multiple of batch_per_rank × ranks")
    versions = summary["versions"]
    if not isinstance(versions.get("python"), str) or not (
            isinstance(versions.get("torch"), str) or isinstance(versions.get("tensorflow"), str)):
        raise RunFormatError("summary: versions needs python and torch or tensorflow strings")
    communication = summary.get("communication", "horovod")  # runs before --backend existed were Horovod's
    if communication not in COMMUNICATIONS:
        raise RunFormatError(f"summary: communication must be one of {COMMUNICATIONS}, got {communication!r}")
    if communication == "horovod" and not isinstance(versions.get("horovod"), str):
        raise RunFormatError("summary: a Horovod run's versions need a horovod string")
    throughput = summary["throughput"]
    for key in ("images_per_s", "ci95_low", "ci95_high"):
        if key not in throughput:
            raise RunFormatError(f"summary: throughput lacks {key!r}")
        if throughput[key] is not None:
            _check_number("summary.throughput", key, throughput[key], _NUM, 0.0)
    if throughput["images_per_s"] is not None and not (
            throughput["ci95_low"] <= throughput["images_per_s"] <= throughput["ci95_high"]):
        raise RunFormatError("summary: throughput.images_per_s lies outside [ci95_low, ci95_high]")
    per_rank = throughput.get("per_rank_images_per_s")
    if not isinstance(per_rank, list) or (per_rank and len(per_rank) != summary["ranks"]):
        raise RunFormatError("summary: throughput.per_rank_images_per_s must list one value per rank (or none)")
    for key in TIME_KEYS:
        if key not in summary["times"]:
            raise RunFormatError(f"summary: times lacks {key!r}")
        if summary["times"][key] is not None:
            _check_number("summary.times", key, summary["times"][key], _NUM, 0.0)
    if summary["eval"] is not None:
        for key in ("top1", "top5"):
            value = summary["eval"].get(key)
            _check_number("summary.eval", key, value, _NUM, 0.0)
            if value > 1.0:
                raise RunFormatError(f"summary: eval.{key} is a fraction in [0, 1], got {value}")
    return summary


# ---------------------------------------------------------------- statistics


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)


def t_quantile_975(dof: int) -> float:
    """0.975 quantile of Student's t with ``dof`` degrees of freedom (table to 30, then a Cornish-Fisher
    expansion z + (z³ + z)/(4ν) + (5z⁵ + 16z³ + 3z)/(96ν²), within 5e-5 relative there)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


@dataclass(frozen=True)
class Throughput:
    images_per_s: float | None
    ci95_low: float | None
    ci95_high: float | None
    measured_steps: int
    warmup_steps_excluded: int


def warmup_to_exclude(steps: int, warmup_steps: int = DEFAULT_WARMUP_STEPS) -> int:
    """Warm-up steps left out: ``warmup_steps``, but always keep at least 2 measured steps when there are 3+."""
    return max(0, min(warmup_steps, steps - 2))


def throughput_ci(step_times: Sequence[float], images_per_step: int,
                  warmup_steps: int = DEFAULT_WARMUP_STEPS) -> Throughput:
    """Throughput and its 95 % interval from per-step (slowest-rank) times; see the module docstring."""
    excluded = warmup_to_exclude(len(step_times), warmup_steps)
    measured = [float(t) for t in step_times[excluded:]]
    n = len(measured)
    if n == 0 or sum(measured) <= 0:
        return Throughput(None, None, None, n, excluded)
    mean = sum(measured) / n
    if n == 1:
        x = images_per_step / mean
        return Throughput(x, x, x, n, excluded)
    var = sum((t - mean) ** 2 for t in measured) / (n - 1)
    half = t_quantile_975(n - 1) * math.sqrt(var / n)
    # A spread wider than the mean (very few, very noisy steps) leaves the upper bound unbounded; cap it.
    high = images_per_step / max(mean - half, mean * 1e-6)
    return Throughput(images_per_step / mean, images_per_step / (mean + half), high, n, excluded)


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- files


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so that readers see the old file or the whole new one: temp file, fsync, rename, fsync dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a run's files are for jobs/ and colleagues to read
        with os.fdopen(fd, "w") as handle:
            json.dump(obj, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


class OutputDirError(ValueError):
    """An output directory that cannot be created or written; the message names the path and the OS error."""


def check_writable_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` (with parents) and prove it writable by writing, fsyncing and removing a probe file.

    Called before any work starts, so a read-only mount, a path under a regular file or a full disk is one
    clear error at start instead of a traceback when the first result is written (possibly hours later).
    Permission bits alone are not checked (``os.access`` lies for root and on some network file systems): the
    probe really writes. Returns the directory; raises OutputDirError.
    """
    path = Path(directory).expanduser()
    probe = path / f".larscale-write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"larscale\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise OutputDirError(f"{path}: cannot write there: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return path


def check_writable_file(path: str | os.PathLike) -> Path:
    """The output file ``path`` can be written: its directory is writable (see check_writable_dir) and the path
    is not a directory. Returns the path; raises OutputDirError."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputDirError(f"{target}: is a directory, not a file")
    check_writable_dir(target.parent)
    return target


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename durable: fsync the directory entry (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_log_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / "steps" / f"rank-{rank:05d}.jsonl"


def read_steps(path: str | os.PathLike, validate: bool = True) -> list[dict]:
    """All records of one rank's step log (a torn last line, from a crash mid-write, is skipped)."""
    records = []
    with open(path) as handle:
        lines = handle.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise RunFormatError(f"{path}:{number}: not JSON") from None
        records.append(dict(validate_step(record)) if validate else record)
    return records


class StepLog:
    """Appends one JSON line per step to ``steps/rank-NNNNN.jsonl``, flushed per line (readers follow live).

    ``keep_below`` (on resume) first drops records of steps at or after the resumed step: steps run after the
    last checkpoint of a killed run are redone, and each step appears once in the log.
    """

    def __init__(self, run_dir: str | os.PathLike, rank: int, keep_below: int | None = None) -> None:
        self.path = step_log_path(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_below is not None and self.path.exists():
            kept = [r for r in read_steps(self.path, validate=False) if r.get("step", 0) < keep_below]
            tmp = self.path.with_suffix(".jsonl.tmp")
            with open(tmp, "w") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
        elif keep_below is None and self.path.exists():
            self.path.unlink()
        self._handle = open(self.path, "a", buffering=1)

    def write(self, record: Mapping[str, Any]) -> None:
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._handle.close()
