"""Checkpoint files: atomic writes by rank 0, keep the last K, find the newest complete one.

A checkpoint is ``DIR/checkpoints/ckpt-<step:08d>.pt``. It is written to a temporary file in the same
directory, flushed and fsync'ed, then renamed over the final name (``os.replace`` is atomic within a file
system), and the directory is fsync'ed so the rename survives a crash. A reader therefore sees either no file
or a whole one under the final name; stray ``*.tmp`` files come from writers killed mid-write and are ignored
(and removed by the next successful save). A checkpoint also carries ``"complete": True`` written last in
its dictionary, and :func:`latest` skips files that fail to load or lack it, so a truncated file copied by
hand cannot be resumed from by mistake.

The serializer is a parameter so PyTorch runs store ``torch.save`` archives and TensorFlow runs pickled
NumPy arrays (no torch needed) under the same names and rules.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from larscale.runformat import fsync_dir

CHECKPOINT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space, I/O error); the older checkpoints are intact."""

    def __str__(self) -> str:
        return str(self.strerror)


class _RecordingWriter:
    """A binary file's ``write`` that remembers the OSError it raised (serializers may re-raise another type)."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        try:
            self._handle.flush()
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"ckpt-{step:08d}.pt"


def pickle_dump(state: dict, handle: BinaryIO) -> None:
    pickle.dump(state, handle, protocol=pickle.HIGHEST_PROTOCOL)


def pickle_load(handle: BinaryIO) -> dict:
    return pickle.load(handle)


def save(run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int,
         dump: Callable[[dict, BinaryIO], None] = pickle_dump) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically and keep only the ``keep`` newest."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    state = {**state, "step": step, "complete": True}
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise CheckpointWriteError(err.errno, f"cannot write checkpoint {final}: {err.strerror}; the previous "
                                   "checkpoints are untouched") from err
    writer = None
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as handle:
            writer = _RecordingWriter(handle)
            dump(state, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # Disk full or a vanished mount: say which file and that nothing older was touched (the rename never
        # happened). The serializer may hide the OS error: torch.save turns a failed write into
        # "RuntimeError: [enforce fail at inline_container.cc] unexpected pos", so the writer keeps the original.
        cause = err if isinstance(err, OSError) else (writer.error if writer is not None else None)
        if cause is not None and not isinstance(err, CheckpointWriteError):
            raise CheckpointWriteError(cause.errno, f"cannot write checkpoint {final}: {cause.strerror or cause}; "
                                       "the previous checkpoints are untouched") from err
        raise
    fsync_dir(directory)
    prune(run_dir, keep)
    return final


def listed(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file under its final name, oldest first."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = CHECKPOINT_RE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints, and temporary files of interrupted writes."""
    for _, path in listed(run_dir)[:-keep]:
        path.unlink(missing_ok=True)
    for entry in checkpoint_dir(run_dir).glob(".ckpt-*.tmp"):
        entry.unlink(missing_ok=True)


def latest(run_dir: str | os.PathLike,
           load: Callable[[BinaryIO], dict] = pickle_load) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads and is marked complete, with its state; None when there is none."""
    for _, path in reversed(listed(run_dir)):
        try:
            with open(path, "rb") as handle:
                state = load(handle)
        except Exception:  # noqa: BLE001 - a damaged file is skipped, an older one may be whole
            continue
        if isinstance(state, dict) and state.get("complete") is True:
            return path, state
    return None


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``path`` (its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    stats = os.statvfs(probe)
    return stats.f_bavail * stats.f_frsize


def space_problem(run_dir: str | os.PathLike, checkpoint_bytes: int, keep: int, checkpoints_planned: int) -> str | None:
    """Why the checkpoints of a run cannot fit in ``run_dir``, or None when they can.

    At the peak the directory holds ``min(keep + 1, planned)`` checkpoints (the new one is renamed in before the
    oldest is pruned). Checkpoints already there (a resumed run) are pruned as the run goes, so their bytes count
    as available. ``checkpoint_bytes`` is an estimate (weights + optimizer state): a lower bound, so a refusal is
    never wrong by more than the serializer's few kilobytes of overhead.
    """
    peak = min(keep + 1, max(1, checkpoints_planned)) * checkpoint_bytes
    present = sum(path.stat().st_size for _, path in listed(run_dir) if path.exists())
    needed = max(checkpoint_bytes, peak - present)
    available = free_bytes(checkpoint_dir(run_dir))
    if available >= needed:
        return None
    return (f"{run_dir}: only {available / 2**20:.2f} MiB free, but the checkpoints need about "
            f"{needed / 2**20:.2f} MiB ({min(keep + 1, max(1, checkpoints_planned))} × "
            f"{checkpoint_bytes / 2**20:.2f} MiB at the peak); free space, lower --keep or choose another --out")
