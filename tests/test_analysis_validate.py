"""Predicted vs measured with its evidence: load traces, exact repeats, verdicts; runs alone and side by side."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from analysis.params import PerfParams
from analysis.predict import predict_from
from analysis.runs import RunMeasurement, partial_node_speedup, runs_alone
from analysis.validate import LoadTrace, Repeat, diagnose
from analysis.workload import load_workload
from larscale.machine import load_machine

T0 = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)


def at(seconds: float) -> str:
    return (T0 + dt.timedelta(seconds=seconds)).isoformat()


def row(ranks: int, error: float, start: float, end: float, measured: float = 1.0) -> dict:
    return {"model": "resnet50@64", "ranks": ranks, "batch_per_rank": 2, "measured_s": measured, "error": error,
            "started_at": at(start), "finished_at": at(end)}


def trace(points: list[tuple[float, float]]) -> LoadTrace:
    out = LoadTrace()
    for seconds, load in points:
        out.add((T0 + dt.timedelta(seconds=seconds)).timestamp(), load)
    return out


def test_load_trace_mean_over_a_window() -> None:
    t = trace([(0, 1.0), (10, 3.0), (20, 5.0), (30, 7.0)])
    assert t.mean(at(5), at(25)) == pytest.approx(4.0)
    assert t.mean(at(11), at(12)) == pytest.approx(3.0)          # no sample inside: the nearest
    assert math.isnan(LoadTrace().mean(at(0), at(1)))
    assert math.isnan(t.mean(at(100), at(110)))                   # not covered (an earlier run's point)


def test_load_trace_round_trips_through_its_csv(tmp_path) -> None:
    t = trace([(0, 1.0), (10, 3.0)])
    t.write(tmp_path / "data" / "load.csv")
    with (tmp_path / "data" / "load.csv").open("a") as handle:
        handle.write("17000")                                     # a torn last line
    again = LoadTrace.read(tmp_path / "data" / "load.csv")
    assert again.mean(at(0), at(10)) == pytest.approx(2.0) and len(again.samples) == 2


def test_verdicts_follow_the_error_and_the_evidence() -> None:
    t = trace([(0, 1.0), (10, 1.2), (100, 9.0), (110, 9.5), (200, 1.1)])
    rows = [row(1, 0.05, 0, 10),                       # within
            row(2, -0.5, 100, 110),                     # off while the machine was loaded
            row(2, -0.5, 0, 10),                        # off on a quiet machine: the model's
            row(1, 0.4, 200, 210, measured=1.0)]        # off, and its exact repeat differs as much
    repeats = [Repeat(key=("resnet50@64", 2), step_s=1.45, started_at=at(300), finished_at=at(310))]
    out = diagnose(rows, t, cores=2, calibration_load=1.0, repeats=repeats)
    assert out[0]["verdict"] == "within 20%"
    assert out[1]["verdict"].startswith("machine noise: load average 9.2 on 2 cores while it ran (2 of it its own")
    assert out[2]["verdict"].startswith("model error: -50%")
    assert out[3]["verdict"].startswith("machine noise: the same run repeated at calibration took 1.450 s")
    assert out[3]["drift"] == pytest.approx(1.0 / 1.45 - 1)
    assert math.isnan(out[1]["repeat_s"])                          # 2-rank points have no exact repeat
    # A loaded calibration explains a miss on a quiet point too; a 2-rank point's own ranks are its load.
    loaded_calibration = diagnose([row(2, -0.5, 0, 10)], t, cores=2, calibration_load=6.0)
    assert "the calibration ran at load average 6.0" in loaded_calibration[0]["verdict"]
    own_load = diagnose([row(2, -0.5, 0, 10)], trace([(0, 2.4), (10, 2.6)]), cores=2, calibration_load=2.0)
    assert own_load[0]["verdict"].startswith("model error")


def run(path: str, start: float, end: float, busy: float, batch: int = 2, side: int = 1) -> RunMeasurement:
    return RunMeasurement(path=path, model="resnet50", image_size=64, ranks=1, batch_per_rank=batch,
                          threads_per_rank=1, steps_measured=5, step_s=busy, step_s_mean=busy, busy_s=busy,
                          allreduce_s=0.0, compute_s=busy, optimizer_s=0.0, data_s=0.0, hosts=("h",),
                          started_at=at(start), finished_at=at(end), side_by_side=side)


def test_runs_alone_and_the_partial_node_speedup() -> None:
    pair = [run("p0", 0, 10, 0.30), run("p1", 1, 11, 0.32)]
    alone = run("a", 20, 30, 0.20)
    other = run("b", 40, 50, 0.25, batch=4)
    assert [r.path for r in runs_alone([*pair, alone, other])] == ["a", "b"]
    loaded = run("p0 + p1", 0, 11, 0.32, side=2)
    factor, notes = partial_node_speedup([loaded], [alone, other])       # b=4 has no loaded twin: unused
    assert factor == pytest.approx(0.32 / 0.20) and len(notes) == 2
    assert partial_node_speedup([loaded], [other]) == (None, [])


def test_partial_node_speedup_applies_to_nodes_with_fewer_ranks() -> None:
    params = PerfParams.from_machine(load_machine("local")).replace(partial_node_speedup=1.25)
    w = load_workload("resnet50", 64)
    full = predict_from(w, params, 1, 4, 1, ranks_per_node=2, image_size=64).record(0)
    alone = predict_from(w, params, 1, 2, 1, ranks_per_node=1, image_size=64).record(0)
    plain = predict_from(w, params.replace(partial_node_speedup=1.0), 1, 2, 1, ranks_per_node=1,
                         image_size=64).record(0)
    assert alone["compute_s"] == pytest.approx(plain["compute_s"] / 1.25)
    same_loaded = predict_from(w, params.replace(partial_node_speedup=1.0), 1, 4, 1, ranks_per_node=2,
                               image_size=64).record(0)
    assert full["compute_s"] == pytest.approx(same_loaded["compute_s"])   # a full node: unchanged
