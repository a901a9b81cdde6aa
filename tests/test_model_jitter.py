"""Step-time jitter from the runs' step logs, into calibrated profiles and the wait for the slowest rank."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from analysis.calibrate import calibrated_profile
from analysis.jitter import measured_jitter, rank_step_cvs
from analysis.params import PerfParams
from analysis.predict import expected_max_normal, predict_from
from analysis.workload import load_workload
from larscale.machine import load_machine, parse_machine
from larscale.runformat import StepLog


def write_run(root, busy_by_rank: list[list[float]], allreduce_s: float = 0.01, warmup: int = 2):
    """A run directory as the trainer writes it: one step log per rank (StepLog) and the summary's warm-up."""
    root.mkdir(parents=True)
    (root / "summary.json").write_text(json.dumps({"warmup_steps_excluded": warmup}))
    ranks = len(busy_by_rank)
    for rank, busy in enumerate(busy_by_rank):
        log = StepLog(root, rank)
        for step, seconds in enumerate(busy):
            log.write({"step": step, "epoch": 0, "rank": rank, "ranks": ranks, "batch_per_rank": 4,
                       "global_batch": 4 * ranks, "data_s": 0.0, "compute_s": seconds, "allreduce_s": allreduce_s,
                       "optimizer_s": 0.0, "step_s": seconds + allreduce_s, "images_per_s": 4 / seconds,
                       "lr": 0.1, "loss": 1.0, "time": float(step)})
        log.close()
    return root


def test_each_ranks_spread_of_its_busy_time_after_warm_up(tmp_path) -> None:
    rng = np.random.default_rng(3)
    warm = [5.0, 4.0]                                        # warm-up steps: far off, left out
    a = [*warm, *(1.0 + 0.05 * rng.standard_normal(40))]
    b = [*warm, *(2.0 + 0.2 * rng.standard_normal(40))]
    run = write_run(tmp_path / "run", [a, b])
    cvs = rank_step_cvs(run)
    assert cvs == pytest.approx([statistics.stdev(a[2:]) / statistics.fmean(a[2:]),
                                 statistics.stdev(b[2:]) / statistics.fmean(b[2:])])
    found = measured_jitter([run, tmp_path / "missing"])
    assert found.cv == pytest.approx(statistics.median(cvs)) and found.runs == 1 and found.ranks_measured == 2
    assert measured_jitter([tmp_path / "missing"]) is None


def test_calibration_writes_the_jitter_and_the_model_adds_only_the_wait_beyond_it() -> None:
    base = load_machine("local")
    data = calibrated_profile(base, jitter=(0.08, 2, "step-time jitter: test"))
    profile = parse_machine(data)
    assert profile.network.collectives.step_jitter_cv == 0.08
    assert profile.network.collectives.jitter_included_ranks == 2
    assert data["calibration"]["jitter"]["source"] == "step-time jitter: test"
    params = PerfParams.from_machine(profile)
    w = load_workload("resnet50", 64)
    # Two ranks: the measured rates (slowest of two side-by-side runs) already include the wait.
    two = predict_from(w, params, 1, 4, 1, ranks_per_node=2, image_size=64).record(0)
    assert two["jitter_s"] == 0.0
    eight = predict_from(w, params.replace(max_nodes=None), 4, 16, 1, ranks_per_node=2, image_size=64).record(0)
    extra = float(expected_max_normal(8) - expected_max_normal(2))
    assert eight["jitter_s"] == pytest.approx(eight["compute_s"] * 0.08 * extra)
