"""`analysis.fit_comm` / `analysis.fit_compute`: α, β, γ and compute efficiency recovered from noisy synthetic
measurements."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from analysis.calibrate import calibrated_profile, format_report, profile_yaml
from analysis.comm import single_link_time
from analysis.fit_comm import CommFitOptions, default_operations, fit_comm, horovod_cycle_wait_s
from analysis.fit_compute import fit_compute
from analysis.fitting import CalibrationError
from analysis.runs import RunMeasurement, pace_side_by_side, workload_key
from analysis.workload import load_workload
from larscale.benchformat import message_sizes
from larscale.machine import load_machine, parse_machine

ALPHA, BETA, GAMMA = 25e-6, 1.0 / 1.2e9, 1.0 / 6e9      # 25 µs, 1.2 GB/s link, 6 GB/s reduction
NOISE = 0.05


def noisy(value: float, rng: np.random.Generator) -> float:
    return value * (1.0 + rng.uniform(-NOISE, NOISE))


def synthetic_rows(rng: np.random.Generator, ranks=(2, 3, 4, 8, 16), algorithm: str = "ring",
                   reduce_local: bool = True, pingpong: bool = False, sizes=None) -> list[dict]:
    """bench-comm rows on the inter-node link (one rank per node) from the exact formulas, noise within 5 %."""
    sizes = sizes or message_sizes(4, 64 << 20, 4)
    rows = []
    for p in ranks:
        for n in sizes:
            exact = float(single_link_time(algorithm, n, p, ALPHA, BETA, GAMMA))
            rows.append({"operation": "allreduce", "ranks": p, "nodes": p, "ranks_per_node": 1, "bytes": n,
                         "median_s": noisy(exact, rng)})
            if pingpong:
                rows.append({"operation": "pingpong", "ranks": p, "nodes": p, "ranks_per_node": 1, "bytes": n,
                             "median_s": noisy(ALPHA + n * BETA, rng)})
    if reduce_local:
        for n in sizes:
            rows.append({"operation": "reduce_local", "ranks": 2, "nodes": 2, "ranks_per_node": 1, "bytes": n,
                         "median_s": noisy(4e-7 + n * GAMMA, rng)})
    return rows


@pytest.mark.parametrize("algorithm", ["ring", "recursive_doubling", "rabenseifner", "binomial_tree"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_alpha_beta_gamma_within_5_percent(algorithm: str, seed: int) -> None:
    fit = fit_comm(synthetic_rows(np.random.default_rng(seed), algorithm=algorithm),
                   CommFitOptions(algorithm=algorithm))
    assert fit.gamma_source == "reduce_local"
    assert fit.inter.alpha_s == pytest.approx(ALPHA, rel=0.05)
    assert fit.inter.beta_s_per_byte == pytest.approx(BETA, rel=0.05)
    assert fit.gamma_s_per_byte == pytest.approx(GAMMA, rel=0.05)
    assert fit.intra.alpha_s is None                       # no row on one node: nothing said about it
    assert fit.rms_relative("allreduce") < NOISE
    assert fit.max_relative("allreduce") < 2 * NOISE
    # The profile's units: Gb/s and µs.
    assert fit.inter.bandwidth_gbps == pytest.approx(9.6, rel=0.05)
    assert fit.inter.latency_us == pytest.approx(25.0, rel=0.05)


def test_both_links_fitted_from_one_node_and_two_node_rows() -> None:
    rng = np.random.default_rng(7)
    rows = synthetic_rows(rng, ranks=(2, 4))
    alpha_i, beta_i = 2e-6, 1.0 / 8e9
    for q in (2, 4):
        for n in message_sizes(4, 64 << 20, 4):
            exact = float(single_link_time("ring", n, q, alpha_i, beta_i, GAMMA))
            rows.append({"operation": "allreduce", "ranks": q, "nodes": 1, "ranks_per_node": q, "bytes": n,
                         "median_s": noisy(exact, rng)})
    fit = fit_comm(rows)
    assert fit.intra.alpha_s == pytest.approx(alpha_i, rel=0.05)
    assert fit.intra.beta_s_per_byte == pytest.approx(beta_i, rel=0.05)
    assert fit.inter.alpha_s == pytest.approx(ALPHA, rel=0.05)
    assert fit.inter.beta_s_per_byte == pytest.approx(BETA, rel=0.05)
    assert fit.gamma_s_per_byte == pytest.approx(GAMMA, rel=0.05)


def test_allreduce_alone_cannot_split_beta_from_gamma_so_gamma_is_fixed_and_said() -> None:
    # Several p values do not help: the ring's bandwidth terms are (p-1)/p * n * (2 beta + gamma) for every p.
    rows = synthetic_rows(np.random.default_rng(3), reduce_local=False)
    assumed = 1.0 / 20e9
    fit = fit_comm(rows, CommFitOptions(default_gamma_s_per_byte=assumed))
    assert fit.gamma_source == "fixed" and fit.gamma_s_per_byte == assumed
    assert any("collinear" in note for note in fit.notes)
    # What the rows do determine is recovered: alpha and the effective per-byte cost 2 beta + gamma.
    assert fit.inter.alpha_s == pytest.approx(ALPHA, rel=0.05)
    assert 2 * fit.inter.beta_s_per_byte + fit.gamma_s_per_byte == pytest.approx(2 * BETA + GAMMA, rel=0.05)
    # And so the fitted model reproduces the allreduce times it was given.
    assert fit.rms_relative("allreduce") < NOISE
    # The caller may pin gamma from elsewhere; then beta is exact again.
    pinned = fit_comm(rows, CommFitOptions(gamma_s_per_byte=GAMMA))
    assert pinned.inter.beta_s_per_byte == pytest.approx(BETA, rel=0.05)
    assert pinned.gamma_source == "fixed"


def test_single_p_two_ranks_with_reduce_local_rows() -> None:
    fit = fit_comm(synthetic_rows(np.random.default_rng(4), ranks=(2,)))
    assert fit.inter.alpha_s == pytest.approx(ALPHA, rel=0.05)
    assert fit.inter.beta_s_per_byte == pytest.approx(BETA, rel=0.05)
    assert fit.gamma_s_per_byte == pytest.approx(GAMMA, rel=0.05)


def test_pingpong_is_a_separate_diagnostic_fit() -> None:
    rows = synthetic_rows(np.random.default_rng(5), ranks=(2,), pingpong=True)
    # Make the library's allreduce twice as slow per byte as the link (what Open MPI's TCP BTL did): the joint
    # fit must follow the allreduce, the ping-pong fit the link.
    for row in rows:
        if row["operation"] == "allreduce":
            row["median_s"] += row["bytes"] * BETA
    fit = fit_comm(rows)
    assert fit.pingpong["inter"].alpha_s == pytest.approx(ALPHA, rel=0.05)
    assert fit.pingpong["inter"].beta_s_per_byte == pytest.approx(BETA, rel=0.05)
    assert fit.inter.beta_s_per_byte == pytest.approx(2 * BETA, rel=0.05)
    assert fit.rms_relative("allreduce") < NOISE
    joint = fit_comm(rows, CommFitOptions(operations=("allreduce", "pingpong", "reduce_local")))
    assert joint.rms_relative("allreduce") > fit.rms_relative("allreduce")


def test_fit_range_and_errors() -> None:
    rows = synthetic_rows(np.random.default_rng(6), ranks=(2,))
    ranged = fit_comm(rows, CommFitOptions(min_bytes=1024))
    assert all(r["fitted"] == (r["bytes"] >= 1024) for r in ranged.residuals)
    with pytest.raises(CalibrationError, match="at least 2 ranks|multi-rank"):
        fit_comm([r for r in rows if r["operation"] == "reduce_local"])
    one_size = [r for r in rows if r["bytes"] == 1024 and r["operation"] == "allreduce"]
    with pytest.raises(CalibrationError, match="two message sizes"):
        fit_comm(one_size, CommFitOptions(gamma_s_per_byte=GAMMA))
    with pytest.raises(ValueError, match="unknown allreduce algorithm"):
        fit_comm(rows, CommFitOptions(algorithm="butterfly"))


def _runs(rng, sustained: float, half: float, peak: float) -> list[RunMeasurement]:
    runs = []
    for model, size in (("alexnet", None), ("resnet50", 64), ("resnet50", None)):
        flops = load_workload(model, size).flops_per_image
        for batch in (1, 2, 4, 8):
            busy = noisy(flops * (batch + half) / (peak * sustained), rng)
            runs.append(RunMeasurement(path=f"{model}-{size}-{batch}", model=model, image_size=size, ranks=1,
                                       batch_per_rank=batch, threads_per_rank=1, steps_measured=10,
                                       step_s=busy, step_s_mean=busy, busy_s=busy, allreduce_s=0.0,
                                       compute_s=0.8 * busy, optimizer_s=0.2 * busy, data_s=0.0))
    return runs


def _timed_run(path: str, busy: list[float], start: str, finish: str, batch: int = 4,
               hosts: tuple[str, ...] = ("node1",)) -> RunMeasurement:
    steps = tuple({"step_s": b, "busy_s": b, "allreduce_s": 0.0, "compute_s": 0.8 * b, "optimizer_s": 0.2 * b,
                   "data_s": 0.0} for b in busy)
    return RunMeasurement(path=path, model="resnet50", image_size=64, ranks=1, batch_per_rank=batch,
                          threads_per_rank=1, steps_measured=len(busy), step_s=float(np.median(busy)),
                          step_s_mean=float(np.mean(busy)), busy_s=float(np.median(busy)), allreduce_s=0.0,
                          compute_s=0.0, optimizer_s=0.0, data_s=0.0, hosts=hosts,
                          started_at=f"2026-11-21T10:{start}+00:00", finished_at=f"2026-11-21T10:{finish}+00:00",
                          steps=steps)


def test_runs_side_by_side_are_paced_by_the_slowest_per_step() -> None:
    fast = _timed_run("fast", [0.25, 0.26, 0.27, 0.25], "00:00", "00:05")
    slow = _timed_run("slow", [0.36, 0.24, 0.40, 0.38, 0.37], "00:01", "00:06")
    later = _timed_run("later", [0.30, 0.30, 0.30], "05:00", "05:03")              # same workload, alone
    other_batch = _timed_run("b8", [0.5, 0.5, 0.5], "00:00", "00:05", batch=8)      # ran beside, other workload
    other_host = _timed_run("elsewhere", [0.9, 0.9, 0.9], "00:00", "00:05", hosts=("node2",))
    runs, notes = pace_side_by_side([fast, slow, later, other_batch, other_host])
    assert [r.path for r in runs] == ["fast + slow", "later", "b8", "elsewhere"]
    combined = runs[0]
    # Step k of the pair is the slower of the two step k's; the shorter run sets the count.
    assert [s["busy_s"] for s in combined.steps] == [0.36, 0.26, 0.40, 0.38]
    assert combined.busy_s == pytest.approx(0.37) and combined.steps_measured == 4
    assert combined.step_s_mean == pytest.approx(np.mean([0.36, 0.26, 0.40, 0.38]))
    assert combined.compute_s == pytest.approx(0.8 * 0.37)
    assert (combined.started_at, combined.finished_at) == (fast.started_at, slow.finished_at)
    assert runs[1:] == [later, other_batch, other_host]
    assert len(notes) == 1 and "fast + slow" in notes[0] and "slowest" in notes[0]
    # The fit reports the combination; runs built without hosts or times are never combined.
    fit = fit_compute(runs, peak_flops_per_device=0.1e12, notes=notes)
    assert fit.notes[0] == notes[0]
    bare = [dataclasses.replace(r, hosts=()) for r in (fast, slow)]
    assert pace_side_by_side(bare) == (bare, [])


def test_compute_fit_recovers_sustained_fraction_and_half_batch() -> None:
    peak = 0.1e12
    runs = _runs(np.random.default_rng(8), sustained=0.4, half=2.0, peak=peak)
    fit = fit_compute(runs, peak_flops_per_device=peak)
    assert fit.sustained_fraction == pytest.approx(0.4, rel=0.05)
    assert fit.half_efficiency_batch == pytest.approx(2.0, rel=0.10)
    assert fit.rms_relative() < NOISE
    # Measured throughput per (model, batch); a non-native image size gets its own key.
    assert set(fit.measured_images_per_s) == {"alexnet", "resnet50", "resnet50@64"}
    run = runs[0]
    assert fit.measured_images_per_s["alexnet"][1] == pytest.approx(run.batch_per_rank / run.busy_s)
    assert workload_key("resnet50", 224) == "resnet50" and workload_key("alexnet", 227) == "alexnet"


def test_calibrated_profile_is_a_valid_profile_with_the_fit(tmp_path) -> None:
    base = load_machine("local")
    comm = fit_comm(synthetic_rows(np.random.default_rng(9), ranks=(2,)))
    compute = fit_compute(_runs(np.random.default_rng(10), 0.4, 2.0, 0.1e12), peak_flops_per_device=0.1e12)
    data = calibrated_profile(base, comm, compute, name="here", inputs={"bench": ["x.csv"]})
    path = tmp_path / "here.yaml"
    path.write_text(profile_yaml(data))
    profile = load_machine(path)
    assert profile.name == "here"
    assert profile.network.inter_node.bandwidth_gbps == pytest.approx(9.6, rel=0.05)
    assert profile.network.inter_node.latency_us == pytest.approx(25, rel=0.05)
    assert profile.network.reduce_gbytes_per_s == pytest.approx(6.0, rel=0.05)
    assert profile.network.intra_node == base.network.intra_node      # not measured: kept
    assert profile.compute.sustained_fraction == pytest.approx(0.4, rel=0.05)
    assert profile.compute.measured_images_per_s["resnet50@64"]
    cal = profile.calibration
    assert cal["inputs"] == {"bench": ["x.csv"]} and cal["base_profile"] == "local"
    assert cal["network"]["gamma_source"] == "reduce_local"
    assert len(cal["network_residuals"]) == len(comm.residuals)
    assert math.isfinite(cal["compute"]["rms_relative_residual"])
    parse_machine(data)


def test_calibrate_command_writes_a_profile_from_csv_and_reports_errors(tmp_path) -> None:
    import subprocess
    import sys

    from larscale.benchformat import CSV_COLUMNS, write_csv
    from tests.conftest import REPO

    rows = [{c: 0 for c in CSV_COLUMNS} | r | {"label": "synthetic", "dtype": "float32", "mpi_library": "none"}
            for r in synthetic_rows(np.random.default_rng(11), ranks=(2, 4))]
    csv_path = write_csv(rows, tmp_path / "bench.csv")
    out = tmp_path / "cal.yaml"
    proc = subprocess.run([sys.executable, "-m", "larscale", "calibrate", "--machine", "local", "--bench",
                           str(csv_path), "--out", str(out), "--name", "synthetic-net"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "gamma reduce_local" in proc.stdout and "rms relative residual" in proc.stdout
    profile = load_machine(out)
    assert profile.network.inter_node.latency_us == pytest.approx(25, rel=0.05)
    for argv, culprit in ((["--bench", str(tmp_path / "missing.csv")], "missing.csv"),
                          (["--machine", "nowhere", "--bench", str(csv_path)], "nowhere"),
                          (["--runs", str(tmp_path)], "summary.json"),
                          ([], "nothing to calibrate")):
        base = ["--machine", "local"] if "--machine" not in argv else []
        proc = subprocess.run([sys.executable, "-m", "larscale", "calibrate", *base, *argv, "--out",
                               str(tmp_path / "x.yaml")], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2 and culprit in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_compute_calibration_from_real_run_logs(tmp_path) -> None:
    """Real 1-rank training runs (scaling.train) → read_run medians → calibrate --runs → measured images/s."""
    import json
    import shutil
    import statistics
    import subprocess
    import sys

    from analysis.runs import read_run
    from scaling.launch import local_env
    from tests.conftest import REPO

    # Batches far apart: at 32 px a ResNet-50 step is mostly per-layer and optimizer overhead, so 2 and 4 images
    # differed by 0.025 s (0.14 vs 0.16 s) and one CI run's noise inverted them (calibrate then refuses the fit).
    # 2 and 16 differ by ~0.12 s.
    batches = (2, 16)
    dirs = []
    for batch in batches:
        out = tmp_path / f"run-b{batch}"
        proc = subprocess.run([sys.executable, "-m", "scaling.train", "--model", "resnet50", "--image-size", "32",
                               "--batch-per-rank", str(batch), "--steps", "5", "--measure-warmup-steps", "2",
                               "--threads", "1", "--no-eval", "--optimizer", "sgd", "--out", str(out)],
                              capture_output=True, text=True, cwd=REPO, env=local_env(threads_per_rank=1), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        shutil.rmtree(out / "checkpoints", ignore_errors=True)    # 0.2 GB each; only the logs matter here
        dirs.append(out)
        run = read_run(out)
        records = [json.loads(line) for line in (out / "steps" / "rank-00000.jsonl").read_text().splitlines()]
        kept = [r for r in records if r["step"] >= 2]
        assert run.steps_measured == len(kept) == 3 and run.ranks == 1 and run.image_size == 32
        assert run.step_s == pytest.approx(statistics.median(r["step_s"] for r in kept))
        assert run.busy_s == pytest.approx(statistics.median(r["step_s"] - r["allreduce_s"] for r in kept))
    out = tmp_path / "cal.yaml"
    proc = subprocess.run([sys.executable, "-m", "larscale", "calibrate", "--machine", "local", "--runs",
                           *map(str, dirs), "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    profile = load_machine(out)
    table = profile.compute.measured_images_per_s["resnet50@32"]
    assert sorted(table) == list(batches)
    assert table[16] == pytest.approx(16 / read_run(dirs[1]).busy_s)
    assert 0 < profile.compute.sustained_fraction <= 1
    assert [r["batch_per_rank"] for r in profile.calibration["compute"]["runs"]] == list(batches)
    assert "resnet50" not in profile.compute.measured_images_per_s     # 32 px numbers never stand for 224 px


def test_horovod_rows_are_preferred_fitted_by_their_mean_less_the_cycle_wait() -> None:
    """bench-hvd rows: Horovod's path is what training pays. Their time is the mean (calls sum up to the
    time-to-train) and includes half a cycle's wait, which the fit removes so that α is the collective's."""
    rng = np.random.default_rng(5)
    wait = horovod_cycle_wait_s(1.0)
    assert wait == pytest.approx(0.5e-3)
    rows = synthetic_rows(rng, ranks=(2,))
    slow = 1.5   # Horovod's path: the plain MPI rows are 1.5x faster per byte; they must not be fitted
    for r in [r for r in rows if r["operation"] == "allreduce"]:
        exact = float(single_link_time("ring", r["bytes"], 2, ALPHA, slow * BETA, GAMMA)) + wait
        # a bimodal path: the median sits in the fast mode, the mean is what the calls add up to
        rows.append({**r, "operation": "horovod_allreduce", "median_s": 0.8 * exact, "mean_s": noisy(exact, rng)})
    assert default_operations(rows) == ("horovod_allreduce", "reduce_local")
    fit = fit_comm(rows, CommFitOptions(horovod_wait_s=wait))
    assert fit.operations == ("horovod_allreduce", "reduce_local")
    assert fit.gamma_s_per_byte == pytest.approx(GAMMA, rel=0.05)
    assert fit.inter.beta_s_per_byte == pytest.approx(slow * BETA, rel=0.05)
    assert fit.inter.alpha_s == pytest.approx(ALPHA, rel=0.2)
    assert fit.rms_relative("horovod_allreduce") < NOISE
    # Without the cycle wait subtracted, the constant lands in alpha (20 times too large).
    assert fit_comm(rows).inter.alpha_s > 10 * ALPHA
    # Plain MPI rows alone are still fitted as before.
    plain = [r for r in rows if r["operation"] != "horovod_allreduce"]
    assert default_operations(plain) == ("allreduce", "reduce_local")
    assert fit_comm(plain).inter.beta_s_per_byte == pytest.approx(BETA, rel=0.05)


def test_horovod_rows_paced_by_the_cycle_are_left_out_and_alpha_comes_from_the_pingpong() -> None:
    """A Horovod call shorter than a cycle takes the cycle (back-to-back calls lock to it): fitted, those rows
    turned ~0.3 ms of cycle into α here. They are reported, not fitted; α, weakly determined by the longer
    rows (here they also carry a part-cycle wait, as 4 MiB did), is bounded by the ping-pong latency."""
    rng = np.random.default_rng(3)
    cycle, wait = 1e-3, horovod_cycle_wait_s(1.0)
    slow = 1.5
    rows = synthetic_rows(rng, ranks=(2,), pingpong=True)
    for r in [r for r in rows if r["operation"] == "allreduce"]:
        collective = float(single_link_time("ring", r["bytes"], 2, ALPHA, slow * BETA, GAMMA))
        paced = max(cycle + 6e-5, collective + wait + 0.3e-3)      # the plateau: 1.06 ms whatever the size
        rows.append({**r, "operation": "horovod_allreduce", "mean_s": noisy(paced, rng)})
    fit = fit_comm(rows, CommFitOptions(horovod_wait_s=wait, horovod_cycle_s=cycle))
    smallest = next(r for r in rows if r["operation"] == "pingpong" and r["bytes"] == 4)
    assert fit.inter.alpha_s == smallest["median_s"] == pytest.approx(ALPHA, rel=0.1)   # the bound, not 0.15 ms
    assert fit.inter.beta_s_per_byte == pytest.approx(slow * BETA, rel=0.05)
    short = [r for r in fit.residuals if r["operation"] == "horovod_allreduce" and r["measured_s"] < 4 * cycle]
    assert short and not any(r["fitted"] for r in short)
    assert any("not fitted" in note for note in fit.notes)
    assert any("above the ping-pong latency" in note for note in fit.notes)
    # Fitted as before (every row, α free), the plateau lands in α: ten times the true latency.
    assert fit_comm(rows, CommFitOptions(horovod_wait_s=wait)).inter.alpha_s > 10 * ALPHA
    # A second round whose peer was descheduled (its 4-byte ping-pong read a wake-up, 60 times the latency) does
    # not raise the bound: a latency is the least a message took, not a median over rounds.
    woken = [{**r, "median_s": 60 * r["median_s"]} for r in rows if r["operation"] == "pingpong" and r["bytes"] == 4]
    twice = fit_comm(rows + woken, CommFitOptions(horovod_wait_s=wait, horovod_cycle_s=cycle))
    assert twice.inter.alpha_s == smallest["median_s"]
    # A loaded machine (a CI run here): every ping-pong's median read a wake-up (1-4 ms at every size), but each
    # row's fastest repetition did not. The bound is the least of those, not 2 ms charged to every bucket.
    loaded = [{**r, "min_s": r["median_s"], "median_s": 2e-3 + r["median_s"]} if r["operation"] == "pingpong"
              else r for r in rows]
    under_load = fit_comm(loaded, CommFitOptions(horovod_wait_s=wait, horovod_cycle_s=cycle))
    assert under_load.inter.alpha_s == smallest["median_s"] == pytest.approx(ALPHA, rel=0.1)
    assert under_load.inter.beta_s_per_byte == pytest.approx(slow * BETA, rel=0.05)
    # No ping-pong rows: α comes from the longer rows, and the report says it is weakly determined.
    without = fit_comm([r for r in rows if r["operation"] != "pingpong"],
                       CommFitOptions(horovod_wait_s=wait, horovod_cycle_s=cycle))
    assert without.inter.beta_s_per_byte == pytest.approx(slow * BETA, rel=0.1)
    assert any("weakly determined" in note for note in without.notes)
    # Every Horovod row under four cycles: nothing to fit, said so.
    with pytest.raises(CalibrationError, match="under 4 Horovod cycles"):
        fit_comm([r for r in rows if r["operation"] != "allreduce" and r["bytes"] <= 1 << 20],
                 CommFitOptions(horovod_wait_s=wait, horovod_cycle_s=cycle))


def test_fused_rows_give_the_fusion_copy_cost() -> None:
    """horovod_allreduce_fused rows (a group Horovod copies into its fusion buffer and back) are the lone
    allreduce plus 2n·δ: fitted jointly, δ comes back within 5 %, and the calibrated profile carries it."""
    rng = np.random.default_rng(11)
    wait = horovod_cycle_wait_s(1.0)
    copy = 1.0 / 7e9                                        # 7 GB/s: this machine's memcpy rate
    rows = synthetic_rows(rng, ranks=(2,))
    for r in [r for r in rows if r["operation"] == "allreduce"]:
        lone = float(single_link_time("ring", r["bytes"], 2, ALPHA, BETA, GAMMA)) + wait
        rows.append({**r, "operation": "horovod_allreduce", "mean_s": noisy(lone, rng)})
        if r["bytes"] >= 64:
            rows.append({**r, "operation": "horovod_allreduce_fused", "mean_s": noisy(lone + 2 * r["bytes"] * copy,
                                                                                       rng)})
    assert default_operations(rows) == ("horovod_allreduce", "horovod_allreduce_fused", "reduce_local")
    fit = fit_comm(rows, CommFitOptions(horovod_wait_s=wait))
    assert fit.copy_s_per_byte == pytest.approx(copy, rel=0.05)
    assert fit.inter.beta_s_per_byte == pytest.approx(BETA, rel=0.05)
    assert fit.rms_relative("horovod_allreduce_fused") < NOISE
    assert "fusion-buffer copy" in format_report(fit, None)
    data = calibrated_profile(load_machine("local"), comm=fit)
    assert data["network"]["fusion_copy_gbytes_per_s"] == pytest.approx(7.0, rel=0.05)
    # Without fused rows δ is not fitted and the base profile's value stays.
    lone_only = fit_comm([r for r in rows if r["operation"] != "horovod_allreduce_fused"],
                         CommFitOptions(horovod_wait_s=wait))
    assert lone_only.copy_s_per_byte is None
    base = load_machine("local")
    kept = calibrated_profile(base, comm=lone_only)["network"].get("fusion_copy_gbytes_per_s")
    assert kept == base.network.fusion_copy_gbytes_per_s
