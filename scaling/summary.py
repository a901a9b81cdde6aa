"""What a run reports: per-step phase times kept for the summary, summary.json, and the progress line.

Schema: larscale/RUN_FORMAT.md (``larscale.run/1``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from larscale.runformat import SCHEMA, TIME_KEYS, throughput_ci, validate_summary, write_json_atomic
from scaling.config import TrainConfig
from scaling.rank import RankInfo, utc_now
from scaling.runplan import RunPlan


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


def build_summary(config: TrainConfig, plan: RunPlan, status: str, ranks: RankInfo, all_hosts: Sequence[str],
                  all_local_sizes: Sequence[int], all_times: Sequence[StepTimes], steps_done: int,
                  threads: int, versions: dict[str, str], started_at: str, checkpoint: str | None,
                  evaluation: dict[str, float] | None, dataset_name: str,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary.json object (schema larscale.run/1) from every rank's step times.

    Step k's pace is the slowest rank's ``step_s`` (see larscale.runformat.throughput_ci); phase means are taken
    per rank over the measured steps and then averaged over ranks. ``extra`` entries (the backend's description)
    are added before the summary is validated.
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
        **(extra or {}),
    }
    return dict(validate_summary(summary))


def write_summary(run_dir: str | os.PathLike, summary: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / "summary.json", summary)


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
