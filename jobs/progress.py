"""Progress within a running point, read from its line-buffered step log, and a display for it.

The trainer appends one JSON line per step to ``steps/rank-NNNNN.jsonl`` and flushes it, so the newest lines
of rank 0's log tell where a run is: step k of n, images/s of the whole job (global batch over the median of
the recent step times) and an ETA (the steps left at that pace). Only the tail of the file is read.

:class:`ProgressDisplay` shows it: on a terminal one line that updates in place (carriage return), with state
changes printed as lines of their own above it; when the output is a file or a pipe (a job log, CI), plain
lines, at most one per point every ``plain_every_s`` seconds.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

# Bytes read from the end of a step log: ~40 records of ~300 bytes.
TAIL_BYTES = 12288
RECENT = 20


@dataclass(frozen=True)
class RunProgress:
    steps_done: int                   # last logged step + 1
    steps_planned: int | None         # None when the run is given in epochs (the trainer knows, we do not)
    images_per_s: float | None        # the whole job's rate
    eta_s: float | None

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.steps_done / self.steps_planned) if self.steps_planned else None


def _tail_records(path: Path) -> list[dict]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - TAIL_BYTES))
            chunk = handle.read().decode(errors="replace")
    except OSError:
        return []
    lines = chunk.splitlines()
    if size > TAIL_BYTES and lines:
        lines = lines[1:]         # the first line of the chunk is probably cut
    records = []
    for line in lines[-RECENT:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue              # a line being written
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def read_progress(run_dir: str | Path, steps_planned: int | None = None) -> RunProgress | None:
    """Where the run in ``run_dir`` is, from rank 0's step log (None before its first step)."""
    logs = Path(run_dir) / "steps"
    path = logs / "rank-00000.jsonl"
    if not path.exists():
        candidates = sorted(logs.glob("rank-*.jsonl")) if logs.is_dir() else []
        if not candidates:
            return None
        path = candidates[0]
    records = _tail_records(path)
    if not records:
        return None
    done = records[-1]["step"] + 1
    step_times = [float(r["step_s"]) for r in records if isinstance(r.get("step_s"), int | float) and r["step_s"] > 0]
    rate = eta = None
    if step_times:
        step_s = statistics.median(step_times)
        batch = records[-1].get("global_batch")
        rate = batch / step_s if isinstance(batch, int) and batch > 0 else None
        if steps_planned:
            eta = max(0, steps_planned - done) * step_s
    return RunProgress(steps_done=done, steps_planned=steps_planned, images_per_s=rate, eta_s=eta)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def describe_progress(progress: RunProgress, attempt: int | None = None) -> str:
    """``step 120/300 (40 %), 1,510 img/s, ETA 2m10s`` (+ ``, attempt 2`` after a retry)."""
    if progress.steps_planned:
        text = f"step {progress.steps_done}/{progress.steps_planned} ({100 * progress.fraction:.0f} %)"
    else:
        text = f"step {progress.steps_done}"
    if progress.images_per_s is not None:
        text += f", {progress.images_per_s:,.0f} img/s"
    if progress.eta_s is not None:
        text += f", ETA {format_duration(progress.eta_s)}"
    if attempt and attempt > 1:
        text += f", attempt {attempt}"
    return text


class ProgressDisplay:
    """Transient progress lines (``update``) and permanent lines (``say``) on one stream."""

    def __init__(self, stream: TextIO | None = None, plain_every_s: float = 30.0,
                 terminal: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.plain_every_s = plain_every_s
        self._shown = ""                   # the transient line on the terminal
        self._plain: dict[str, float] = {}  # key → when its last plain line was printed

    def update(self, key: str, text: str) -> None:
        """Progress of ``key`` (a point): replaces the previous progress line on a terminal; elsewhere a plain
        line when ``key`` is new or its last line is ``plain_every_s`` old."""
        if self.terminal:
            # One row only: a wrapped line could not be rewritten in place.
            text = text[:max(20, shutil.get_terminal_size().columns - 1)]
            self.stream.write("\r" + text + " " * max(0, len(self._shown) - len(text)))
            self.stream.flush()
            self._shown = text
            return
        now = time.monotonic()
        if key not in self._plain or now - self._plain[key] >= self.plain_every_s:
            self._plain[key] = now
            print(text, file=self.stream, flush=True)

    def say(self, text: str) -> None:
        """A line that stays (a state change), printed above the progress line on a terminal."""
        self.clear()
        print(text, file=self.stream, flush=True)

    def clear(self) -> None:
        if self.terminal and self._shown:
            self.stream.write("\r" + " " * len(self._shown) + "\r")
            self.stream.flush()
            self._shown = ""
