"""analysis/: cost formulas, overlap schedule, compute model, prediction, time-to-accuracy, reproduce, plan."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from analysis import comm
from analysis.accuracy import AccuracyError, epochs_to_accuracy
from analysis.compute import efficiency, measured_step_seconds
from analysis.overlap import CHUNK, simulate
from analysis.params import PerfParams
from analysis.plan import pareto_mask, plan
from analysis.predict import KEYS, predict, predict_from, predict_point
from analysis.reproduce import reproduce
from analysis.workload import IMAGENET_TRAIN_IMAGES, load_workload
from larscale.machine import bundled_machines, load_machine, parse_machine
from tests.conftest import REPO

ALPHA, BETA, GAMMA = 1e-6, 1e-9, 5e-10
N = 1e6


# ---------------------------------------------------------------- communication


@pytest.mark.parametrize("algorithm, expected", [
    # p = 4 ranks on one link, n = 1 MB, worked by hand from the formulas in analysis/comm.py
    ("ring", 2 * 3 * ALPHA + 2 * 3 / 4 * N * BETA + 3 / 4 * N * GAMMA),            # 1.881 ms
    ("recursive_doubling", 2 * (ALPHA + N * BETA + N * GAMMA)),                     # 3.002 ms
    ("rabenseifner", 2 * 2 * ALPHA + 2 * 3 / 4 * N * BETA + 3 / 4 * N * GAMMA),     # 1.879 ms
    ("binomial_tree", 2 * 2 * (ALPHA + N * BETA) + 2 * N * GAMMA),                  # 5.004 ms
])
def test_single_link_costs_match_hand_computation(algorithm: str, expected: float) -> None:
    got = comm.single_link_time(algorithm, N, 4, ALPHA, BETA, GAMMA)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    assert {"ring": 1.881e-3, "recursive_doubling": 3.002e-3, "rabenseifner": 1.879e-3,
            "binomial_tree": 5.004e-3}[algorithm] == pytest.approx(float(got), rel=1e-9)


def test_hierarchical_cost_by_hand() -> None:
    # 2 nodes x 4 ranks: binomial reduce/broadcast in the node (2 levels), ring over 2 leaders.
    cost = comm.LinkCost(0.5e-6, 0.25e-9, 2e-6, 1e-9, GAMMA)
    got = float(comm.allreduce_time("hierarchical", N, 2, 4, cost))
    intra = 2 * 2 * (0.5e-6 + N * 0.25e-9) + 2 * N * GAMMA
    inter = 2 * 1 * 2e-6 + 2 * (1 / 2) * N * 1e-9 + (1 / 2) * N * GAMMA
    assert got == pytest.approx(intra + inter, rel=1e-12)
    assert got == pytest.approx(3.256e-3, rel=1e-9)


@pytest.mark.parametrize("algorithm", comm.ALGORITHMS)
def test_one_rank_communicates_nothing(algorithm: str) -> None:
    cost = comm.LinkCost(1e-5, 1e-9, 1e-5, 1e-9, 1e-9)
    assert float(comm.allreduce_time(algorithm, 1e8, 1, 1, cost)) == 0.0


@pytest.mark.parametrize("algorithm", ["ring", "rabenseifner"])
@pytest.mark.parametrize("ranks", [2, 4, 8, 64, 1024])
def test_bandwidth_term_is_bandwidth_optimal(algorithm: str, ranks: int) -> None:
    got = float(comm.single_link_time(algorithm, N, ranks, 0.0, BETA, 0.0))
    assert got == pytest.approx(2 * (ranks - 1) / ranks * N * BETA, rel=1e-12)


def test_ring_bandwidth_term_any_rank_count() -> None:
    ranks = np.array([3, 5, 6, 7, 12])
    got = comm.single_link_time("ring", N, ranks, 0.0, BETA, 0.0)
    np.testing.assert_allclose(got, 2 * (ranks - 1) / ranks * N * BETA, rtol=1e-12)


def test_bus_bandwidth_of_a_link_speed_allreduce_is_the_link_speed() -> None:
    for ranks in (2, 8, 512):
        t = comm.single_link_time("ring", N, ranks, 0.0, BETA, 0.0)
        assert float(comm.bus_bandwidth(N, t, ranks)) == pytest.approx(1 / BETA)
        assert float(comm.algorithm_bandwidth(N, t)) == pytest.approx(N / float(t))


def test_terms_are_a_least_squares_design_matrix() -> None:
    # Times generated from known parameters are recovered exactly: the model is linear in (α_i, α_e, β_i, β_e, γ).
    truth = comm.LinkCost(0.7e-6, 0.2e-9, 3e-6, 1.1e-9, 0.4e-9)
    nbytes = np.repeat([1e3, 1e5, 1e7], 6)
    nodes = np.tile([1, 1, 2, 4, 8, 16], 3)
    per_node = np.tile([2, 4, 1, 2, 4, 8], 3)
    rows, times = [], []
    for algorithm in ("ring", "binomial_tree", "recursive_doubling"):
        terms = comm.allreduce_terms(algorithm, nbytes, nodes, per_node)
        rows.append(terms.matrix())
        times.append(terms.time(truth))
    fit, *_ = np.linalg.lstsq(np.vstack(rows), np.concatenate(times), rcond=None)
    np.testing.assert_allclose(fit, [truth.alpha_intra_s, truth.alpha_inter_s, truth.beta_intra_s_per_byte,
                                     truth.beta_inter_s_per_byte, truth.gamma_s_per_byte], rtol=1e-6)


def test_unknown_algorithm_is_named() -> None:
    with pytest.raises(ValueError, match="'tree'"):
        comm.allreduce_terms("tree", 1, 2)


def test_fuse_buckets_greedy_and_large_tensors_alone() -> None:
    assert comm.fuse_buckets([10, 20, 30, 100, 5, 5], 50) == [[0, 1], [2], [3], [4, 5]]
    assert comm.fuse_buckets([], 50) == []


# ---------------------------------------------------------------- overlap schedule

FRACTIONS = np.array([0.2, 0.5, 1.0])
BYTES = np.array([100.0, 100.0, 100.0])


def _one(per_byte: float, fusion: float = 1000.0, cycle: float = 0.0):
    r = simulate(FRACTIONS, BYTES, 1.0, 0.1, per_byte, fusion, cycle)
    return float(r.finish_s), float(r.comm_exposed_s), int(r.buckets), float(r.comm_total_s)


def test_fast_network_sends_each_gradient_as_it_comes() -> None:
    # launches 0.2, 0.5, 1.0; each takes 0.1 + 0.1: the last ends 0.2 after the backward pass.
    assert _one(0.001) == pytest.approx((1.2, 0.2, 3, 0.6))


def test_busy_network_fuses_what_is_ready() -> None:
    # bucket 1 runs 0.2..1.3; events 2 and 3 are both ready by then and go together (200 bytes): ends 3.4.
    assert _one(0.01) == pytest.approx((3.4, 2.4, 2, 3.2))
    # with a 150-byte buffer they cannot share: 1.3..2.4 and 2.4..3.5.
    assert _one(0.01, fusion=150.0) == pytest.approx((3.5, 2.5, 3, 3.3))


def test_cycle_time_delays_idle_launches_by_half_a_cycle() -> None:
    finish, exposed, buckets, _ = _one(0.001, cycle=0.2)
    assert (finish, buckets) == pytest.approx((1.3, 3))


@pytest.mark.parametrize("per_byte, fraction, expected", [
    # (finish, exposed, buckets, total); a share 1 − fraction of A = 0.1 and B occupies the compute cores.
    # Fast network, half of it serial: the schedule runs buckets of 0.05 + 0.05 s (launched 0.2, 0.5, 1.0; the
    # last ends at 1.1); total 3·0.1 + 300·0.001 = 0.6, serial 0.3: exposed 0.1 + 0.3, finish 1.1 + 0.3.
    (0.001, 0.5, (1.4, 0.4, 3, 0.6)),
    # All serial: the zero-cost schedule ends with the backward pass; exposed = total.
    (0.001, 0.0, (1.6, 0.6, 3, 0.6)),
    # Busy network, half serial. Buckets form on the full costs: event 1 alone 0.2..1.3, events 2 and 3 (ready
    # 0.5, 1.0) fused for the launch at 1.3. Timed with the overlappable halves (0.05 + 0.005 s/B): 0.2..0.75,
    # then bucket 2 waits for event 3 (1.0) and takes 0.05 + 1.0: ends 2.05. Total 2·0.1 + 300·0.01 = 3.2,
    # serial 1.6: exposed 1.05 + 1.6.
    (0.01, 0.5, (3.65, 2.65, 2, 3.2)),
    # Nothing serial is the plain schedule (test_busy_network_fuses_what_is_ready).
    (0.01, 1.0, (3.4, 2.4, 2, 3.2)),
])
def test_compute_core_share_of_communication_adds_to_the_step(per_byte, fraction, expected) -> None:
    r = simulate(FRACTIONS, BYTES, 1.0, 0.1, per_byte, 1000.0, 0.0,
                 serial_latency_s=0.1 * (1 - fraction), serial_s_per_byte=per_byte * (1 - fraction))
    got = float(r.finish_s), float(r.comm_exposed_s), int(r.buckets), float(r.comm_total_s)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("serial_copy", [0.0, 0.0005])
def test_buckets_pay_the_fusion_copies(serial_copy) -> None:
    # Busy network, δ = 0.001 s/B: every event fits the buffer, so each byte costs 0.01 + 2·0.001. Event 1
    # 0.2..1.5; events 2 and 3 fused at 1.5 (event 3 joins, ready at 1.0): 1.5..4.0. Total 0.2 + 3.0 + 0.6.
    # With half the copy serial the hidden timeline runs at 0.011 s/B (0.2..1.4, 1.4..3.7) and 0.3 s is serial:
    # the same 3.0 s exposed.
    r = simulate(FRACTIONS, BYTES, 1.0, 0.1, 0.01, 1000.0, 0.0, copy_s_per_byte=0.001,
                 serial_copy_s_per_byte=serial_copy)
    assert (float(r.finish_s), float(r.comm_exposed_s), int(r.buckets), float(r.comm_total_s)) == pytest.approx(
        (4.0, 3.0, 2, 3.8))
    assert float(r.fused_bytes) == 300.0


def test_a_gradient_larger_than_the_buffer_goes_alone_without_copies() -> None:
    # Fusion buffer 150 B: the 200 B event is reduced in place. Event 1: 0.2 + 0.1 + 100·0.003 → 0.6; event 2
    # 0.6..0.9 (0.001 s/B, no copy); event 3 1.0..1.4. Total 3·0.1 + 0.4 + 2·0.001·200.
    r = simulate(FRACTIONS, np.array([100.0, 200.0, 100.0]), 1.0, 0.1, 0.001, 150.0, 0.0, copy_s_per_byte=0.001)
    assert (float(r.finish_s), float(r.comm_exposed_s), int(r.buckets), float(r.comm_total_s)) == pytest.approx(
        (1.4, 0.4, 3, 1.1))
    assert float(r.fused_bytes) == 200.0
    with pytest.raises(ValueError, match="compute-core share"):
        simulate(FRACTIONS, BYTES, 1.0, 0.1, 0.01, 1000.0, 0.0, copy_s_per_byte=0.001, serial_copy_s_per_byte=0.002)


def test_bad_overlap_shares_are_named() -> None:
    with pytest.raises(ValueError, match="compute-core share"):
        simulate(FRACTIONS, BYTES, 1.0, 0.1, 0.001, 1000.0, 0.0, serial_latency_s=0.2)
    for path in (("network", "reduce_overlap_fraction"), ("network", "intra_node", "overlap_fraction")):
        machine = load_machine("local").to_dict()
        section = machine
        for key in path[:-1]:
            section = section[key]
        section[path[-1]] = 1.5
        with pytest.raises(ValueError, match=".".join(path)):
            parse_machine(machine)


def test_vectorised_schedule_equals_one_at_a_time() -> None:
    rng = np.random.default_rng(7)
    size = CHUNK + 37        # crosses a chunk boundary
    backward = rng.uniform(0.01, 1.0, size)
    latency = rng.uniform(0, 0.05, size)
    per_byte = rng.uniform(0, 0.02, size)
    fractions = np.sort(rng.uniform(0, 1, 12))
    sizes = rng.uniform(1, 300, 12)
    copy = rng.uniform(0, 0.005, size)
    together = simulate(fractions, sizes, backward, latency, per_byte, 500.0, 0.004, copy_s_per_byte=copy,
                        serial_copy_s_per_byte=0.5 * copy)
    for i in rng.choice(size, 25, replace=False):
        alone = simulate(fractions, sizes, backward[i], latency[i], per_byte[i], 500.0, 0.004,
                         copy_s_per_byte=copy[i], serial_copy_s_per_byte=0.5 * copy[i])
        assert float(alone.finish_s) == pytest.approx(together.finish_s[i])
        assert float(alone.buckets) == together.buckets[i]
    assert np.all(together.comm_exposed_s <= together.comm_total_s + 1e-12)
    assert np.all(together.comm_exposed_s >= 0)


# ---------------------------------------------------------------- computation


def test_efficiency_halves_at_the_half_efficiency_batch() -> None:
    assert float(efficiency(8, 0.4, 8)) == pytest.approx(0.2)
    assert float(efficiency(1e9, 0.4, 8)) == pytest.approx(0.4)


def test_measured_throughput_interpolates_step_time_linearly_in_batch() -> None:
    points = {8: 100.0, 32: 200.0}          # step 0.08 s at 8, 0.16 s at 32
    got = measured_step_seconds(points, np.array([8, 16, 32, 64]), 4.0)
    np.testing.assert_allclose(got, [0.08, 0.08 + 0.08 / 24 * 8, 0.16, 0.16 + 0.08 / 24 * 32])
    assert float(measured_step_seconds({16: 160.0}, 36, 4.0)) == pytest.approx(0.1 * 40 / 20)


def test_workload_from_the_model_tables() -> None:
    from models.tables import load_table, totals

    w = load_workload("resnet50")
    t = totals("resnet50")
    first = load_table("resnet50")[-1]
    assert w.forward_flops == 2 * t["macs"]
    assert w.backward_flops == 4 * t["macs"] - 2 * first.macs
    assert w.gradient_bytes == t["gradient_bytes"] == 4 * t["params"]
    assert w.event_bytes.sum() == t["gradient_bytes"]
    assert np.all(np.diff(w.event_ready_fraction) > 0) and w.event_ready_fraction[-1] == pytest.approx(1.0)
    alexnet = load_workload("alexnet")
    # fc8's gradient is ready first, after a sliver of the backward pass; the classifier holds >90 % of bytes.
    assert alexnet.event_layers[0] == ("fc8",) and alexnet.event_ready_fraction[0] < 0.02
    assert alexnet.event_bytes[:3].sum() / alexnet.gradient_bytes > 0.9


# ---------------------------------------------------------------- prediction


def test_predict_point_keys_and_identities() -> None:
    r = predict_point("resnet50", "stampede2-knl", 64, 4096, epochs=90)
    for key in KEYS:
        assert key in r and math.isfinite(r[key]) and r[key] >= 0
    iterations = math.ceil(90 * IMAGENET_TRAIN_IMAGES / 4096)
    assert r["iterations"] == iterations
    assert r["time_to_train_s"] == pytest.approx(iterations * r["iteration_s"])
    assert r["epoch_s"] == pytest.approx(IMAGENET_TRAIN_IMAGES / 4096 * r["iteration_s"])
    assert r["images_per_s"] == pytest.approx(4096 / r["iteration_s"])
    assert r["iteration_s"] == pytest.approx(r["compute_s"] + r["comm_exposed_s"] + r["data_exposed_s"])
    assert 0 < r["scaling_efficiency"] <= 1


def test_one_rank_has_no_communication_and_full_efficiency() -> None:
    r = predict_point("alexnet", "stampede2-skx", 1, 64, epochs=1)
    assert r["comm_exposed_s"] == 0 and r["comm_total_s"] == 0 and r["buckets"] == 0
    assert r["scaling_efficiency"] == pytest.approx(1.0)
    assert r["iteration_s"] == pytest.approx(r["compute_s"])


def test_vectorised_prediction_equals_scalar_calls() -> None:
    nodes = np.array([1, 2, 16, 128, 1024, 2048])
    batch = np.array([256, 1024, 4096, 8192, 32768, 32768])
    grid = predict("resnet50_v1", "stampede2-knl", nodes, batch, 64)
    for i in range(nodes.size):
        alone = predict_point("resnet50_v1", "stampede2-knl", int(nodes[i]), int(batch[i]), 64)
        for key in KEYS:
            assert alone[key] == pytest.approx(float(getattr(grid, key)[i]), rel=1e-12)


def test_slow_network_makes_alexnet_communication_bound() -> None:
    machine = load_machine("stampede2-skx").to_dict()
    machine["network"]["inter_node"]["bandwidth_gbps"] = 1.0
    slow = predict_point("alexnet", parse_machine(machine), 64, 2048, 1)
    fast = predict_point("alexnet", "stampede2-skx", 64, 2048, 1)
    assert slow["comm_exposed_s"] > slow["compute_s"] > 0
    assert slow["scaling_efficiency"] < 0.5 < fast["scaling_efficiency"]


def test_data_loading_term() -> None:
    machine = load_machine("stampede2-knl").to_dict()
    machine["compute"]["data_images_per_s"] = 10.0           # 16 images per node → 1.6 s of decoding
    starved = predict_point("resnet50", parse_machine(machine), 2048, 32768, 1)
    assert starved["iteration_s"] == pytest.approx(1.6)
    assert starved["data_exposed_s"] == pytest.approx(1.6 - starved["compute_s"] - starved["comm_exposed_s"])
    machine["compute"]["data_overlapped"] = False
    serial = predict_point("resnet50", parse_machine(machine), 2048, 32768, 1)
    assert serial["iteration_s"] == pytest.approx(1.6 + serial["compute_s"] + serial["comm_exposed_s"])


def test_fitted_parameters_flow_through_predict_from() -> None:
    w = load_workload("resnet50")
    sustained = PerfParams.from_machine(load_machine("local")).replace(compute_model="sustained")
    base = predict_from(w, sustained, 1, 8, 1).compute_s
    faster = predict_from(w, sustained.replace(sustained_fraction=sustained.sustained_fraction * 2), 1, 8, 1).compute_s
    assert float(faster) == pytest.approx(float(base) / 2)
    # The roofline model: calibration's efficiency_scale divides the device's time (host time apart).
    roofline = PerfParams.from_machine(load_machine("local")).replace(host_s_per_op=0.0)
    base = predict_from(w, roofline, 1, 8, 1).compute_s
    faster = predict_from(w, roofline.replace(efficiency_scale=2.0), 1, 8, 1).compute_s
    assert float(faster) == pytest.approx(float(base) / 2)
    params = PerfParams.from_machine(load_machine("local"))
    slower_net = predict_from(w, params.replace(beta_intra_s_per_byte=1e-6), 1, 8, 1)
    assert float(slower_net.comm_total_s) > float(predict_from(w, params, 1, 8, 1).comm_total_s)


def test_no_overlap_puts_all_communication_in_sequence_with_compute() -> None:
    # Every share 0: every allreduce second is a compute-core second. The last gradient (the first layer's)
    # is ready as the backward pass ends, so the step waits for all communication plus half a Horovod cycle.
    machine = load_machine("stampede2-skx").to_dict()
    network = machine["network"]
    network["reduce_overlap_fraction"] = network["intra_node"]["overlap_fraction"] = 0.0
    network["inter_node"]["overlap_fraction"] = 0.0
    serial = predict_point("alexnet", parse_machine(machine), 64, 2048, 1)
    overlapped = predict_point("alexnet", "stampede2-skx", 64, 2048, 1)
    half_cycle = 0.5 * network["cycle_time_ms"] * 1e-3
    assert serial["comm_exposed_s"] == pytest.approx(serial["comm_total_s"] + half_cycle)
    assert serial["iteration_s"] == pytest.approx(serial["compute_s"] + serial["comm_total_s"] + half_cycle)
    assert serial["compute_s"] == overlapped["compute_s"]
    # Buckets form on the full costs (Horovod's thread is busy for a whole collective wherever its cost
    # lands), so the same buckets as with full overlap: the same total.
    assert serial["buckets"] == overlapped["buckets"]
    assert serial["comm_total_s"] == pytest.approx(overlapped["comm_total_s"])
    assert overlapped["comm_exposed_s"] < overlapped["comm_total_s"]          # the default overlaps


def test_serial_collectives_still_fuse_and_fused_buckets_pay_the_copies() -> None:
    # This machine's profile: shared memory, every share serial. Horovod's thread is busy for each collective's
    # full time, so gradients fuse as they would with full overlap (they once formed on the overlappable
    # timeline, where a serial collective takes no time, and every event went alone). A slow link makes it
    # visible: 200 ms of β per step against a ~170 ms backward pass.
    # (The FLOP model of compute, so that the backward pass is the ~170 ms this schedule was sized for.)
    params = PerfParams.from_machine(load_machine("local")).replace(beta_intra_s_per_byte=2e-9,
                                                                    compute_model="sustained")
    overlapping = params.replace(overlap_intra=1.0, overlap_reduce=1.0)
    assert params.copy_s_per_byte == pytest.approx(1 / 7e9)
    w = load_workload("resnet50", image_size=64)
    with_copies = predict_from(w, params, 1, 8, 1, ranks_per_node=2, image_size=64).record(0)
    without = predict_from(w, params.replace(copy_s_per_byte=0.0), 1, 8, 1, ranks_per_node=2,
                           image_size=64).record(0)
    fused_like_overlap = predict_from(w, overlapping, 1, 8, 1, ranks_per_node=2, image_size=64).record(0)
    assert with_copies["buckets"] == fused_like_overlap["buckets"] < len(w.event_bytes) / 2
    # Every ResNet-50 gradient goes through the 64 MiB buffer: 2·δ per gradient byte (longer collectives
    # fuse a little more: a few α fewer). All of it is compute-core time here (reduce_overlap_fraction 0).
    latency, _ = comm.allreduce_affine(params.algorithm, 1, 2, params.link)
    extra = with_copies["comm_total_s"] - without["comm_total_s"]
    fewer = without["buckets"] - with_copies["buckets"]
    assert extra == pytest.approx(2 * w.gradient_bytes * params.copy_s_per_byte - fewer * float(latency), rel=1e-9)
    assert with_copies["comm_exposed_s"] - without["comm_exposed_s"] >= extra - 1e-12
    # One rank: nothing to reduce, nothing copied.
    alone = predict_from(w, params, 1, 4, 1, ranks_per_node=1, image_size=64).record(0)
    assert alone["comm_total_s"] == 0.0


def test_each_cost_term_overlaps_by_its_own_share() -> None:
    # 2 nodes x 1 rank, ring, n bytes: 2α_e + n·β_e + n/2·γ (comm.py). Only the inter-node link is serial here:
    # the compute-core part is 2α_e + n·β_e, the reduction hides. By hand with PerfParams.serial_link.
    params = PerfParams.from_machine(load_machine("local")).replace(
        alpha_inter_s=1e-3, beta_inter_s_per_byte=1e-9, gamma_s_per_byte=1e-10, overlap_intra=0.0,
        overlap_inter=0.0, overlap_reduce=1.0, max_nodes=2, default_ranks_per_node=1, copy_s_per_byte=0.0)
    serial = params.serial_link()
    assert (serial.alpha_inter_s, serial.beta_inter_s_per_byte, serial.gamma_s_per_byte) == (1e-3, 1e-9, 0.0)
    w = load_workload("alexnet")
    r = predict_from(w, params, 2, 8, 1).record(0)
    n = w.gradient_bytes
    assert r["comm_total_s"] == pytest.approx(r["buckets"] * 2e-3 + n * 1e-9 + n / 2 * 1e-10)
    # Exposed: the serial part, plus whatever of the reduction (n/2·γ ≈ 12 ms) the schedule cannot hide.
    assert r["buckets"] * 2e-3 + n * 1e-9 <= r["comm_exposed_s"] <= r["buckets"] * 2e-3 + n * 1e-9 + n / 2 * 1e-10
    hidden = predict_from(w, params.replace(overlap_inter=1.0), 2, 8, 1).record(0)
    assert hidden["comm_exposed_s"] < r["comm_exposed_s"] - 0.2                 # 244 ms of β hide


def test_bundled_profiles_keep_full_overlap_except_local() -> None:
    # The published headlines were reproduced with communication overlapping compute; only this CPU-only
    # machine, whose ranks use every core, says otherwise (larscale/machines/local.yaml explains why).
    for name in bundled_machines():
        params = PerfParams.from_machine(load_machine(name))
        got = (params.overlap_intra, params.overlap_inter, params.overlap_reduce)
        assert got == ((0.0, 1.0, 0.0) if name == "local" else (1.0, 1.0, 1.0)), name


def test_local_launches_set_the_allocator() -> None:
    # Every local launch (submit's local job scripts, bench-comm --ranks, tests) goes through local_env, so
    # calibration and the predicted runs see one allocator setting.
    from scaling.launch import QUIET_MALLOC, local_env

    assert QUIET_MALLOC == {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**30), "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30),
                            "MALLOC_ARENA_MAX": "1"}
    assert {k: local_env({})[k] for k in QUIET_MALLOC} == QUIET_MALLOC
    assert local_env({"MALLOC_MMAP_THRESHOLD_": "65536"})["MALLOC_MMAP_THRESHOLD_"] == "65536"   # caller wins


def test_calibrated_profile_keeps_the_base_overlap_fractions() -> None:
    from analysis.calibrate import calibrated_profile

    for fraction in (0.0, 0.25):
        machine = load_machine("local").to_dict()
        machine["network"]["reduce_overlap_fraction"] = fraction
        machine["network"]["inter_node"]["overlap_fraction"] = fraction / 2
        data = calibrated_profile(parse_machine(machine))
        network = parse_machine(data).network
        assert (network.reduce_overlap_fraction, network.inter_node.overlap_fraction) == (fraction, fraction / 2)
        assert data["calibration"]["from_base_profile"] == {"network.intra_node.overlap_fraction": 0.0,
                                                            "network.inter_node.overlap_fraction": fraction / 2,
                                                            "network.reduce_overlap_fraction": fraction}


def test_measured_throughput_is_read_for_the_workloads_own_image_size() -> None:
    from analysis.compute import measured_key

    assert measured_key("resnet50", 64) == "resnet50@64" and measured_key("resnet50", 224) == "resnet50"
    assert measured_key("alexnet", 227) == measured_key("alexnet", None) == "alexnet"
    machine = load_machine("local").to_dict()
    machine["compute"]["measured_images_per_s"] = {"resnet50@64": {4: 10.0}, "resnet50": {4: 1.0}}
    profile = parse_machine(machine)
    small = predict_point("resnet50", profile, 1, 8, 1, image_size=64)      # 4 per rank at 10 images/s
    native = predict_point("resnet50", profile, 1, 8, 1)                    # 4 per rank at 1 image/s
    assert small["compute_s"] == pytest.approx(0.4) and native["compute_s"] == pytest.approx(4.0)
    other = predict_point("resnet50", profile, 1, 8, 1, image_size=32)      # no measurement at 32 px: FLOPs
    assert other["compute_s"] == pytest.approx(predict_point("resnet50", "local", 1, 8, 1, image_size=32)["compute_s"])


@pytest.mark.parametrize("call, culprit", [
    (lambda: predict_point("resnet99", "stampede2-knl", 2, 64), "resnet99"),
    (lambda: predict_point("resnet50", "cray-1", 2, 64), "cray-1"),
    (lambda: predict_point("resnet50", "stampede2-knl", 5000, 5000), "5000 is beyond"),
    (lambda: predict_point("resnet50", "stampede2-knl", 3, 64), "64 is not divisible by 3"),
    (lambda: predict_point("resnet50", "stampede2-knl", 0, 64), "nodes must be >= 1"),
    (lambda: predict_point("resnet50", "stampede2-knl", 2, 64, epochs=0), "epochs"),
])
def test_bad_input_is_a_clear_error(call, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        call()


def test_every_bundled_profile_predicts() -> None:
    for name in bundled_machines():
        machine = load_machine(name)
        rpn = machine.default_ranks_per_node
        nodes = np.array([1, machine.limits.max_nodes])
        r = predict("resnet50", machine, nodes, nodes * rpn * 32, 1)
        assert np.all(np.isfinite(r.iteration_s)) and np.all(r.iteration_s > 0), name
        assert np.all(r.scaling_efficiency <= 1 + 1e-12), name


def test_device_catalog_agrees_with_bundled_profiles() -> None:
    from analysis.devices import devices, machine_for_device

    by_model = {d.model: d for d in devices().values()}
    matched = 0
    for name in bundled_machines():
        dev = load_machine(name).node.devices
        if dev.model in by_model:
            assert dev.peak_tflops == by_model[dev.model].peak_tflops, name
            matched += 1
    assert matched >= 4
    h100 = machine_for_device("h100", 8, 3200, 16)
    assert predict_point("resnet50", h100, 2, 4096, 1)["images_per_s"] > 0


# ---------------------------------------------------------------- time-to-accuracy


def test_time_to_accuracy_table_point_and_epoch_interpolation() -> None:
    at_most = epochs_to_accuracy("alexnet_bn", 32768, 57.0)
    assert (at_most.epochs, at_most.bound) == (100, "at_most")
    exact = epochs_to_accuracy("resnet50", 16384, 75.5)
    assert (exact.epochs, exact.bound) == (200, "exact")
    between = epochs_to_accuracy("alexnet_bn", 32768, 59.0)       # 57.8 @100, 59.2 @125
    assert between.epochs == pytest.approx(100 + 25 * 1.2 / 1.4)
    assert "piecewise linear" in between.method and between.points


def test_time_to_accuracy_first_crossing_of_a_non_monotone_curve() -> None:
    # ResNet-50 16K: 74.4 @100, 74.1 @125, 74.6 @150 → 74.5 first reached between 125 and 150.
    assert epochs_to_accuracy("resnet50_v1", 16384, 74.5).epochs == pytest.approx(125 + 25 * 0.4 / 0.5)


def test_time_to_accuracy_between_batches_is_log2_interpolated_and_stated() -> None:
    base = 60.4 + (60.1 - 60.4) * (math.log2(6144) - 12)
    assert epochs_to_accuracy("alexnet_bn", 6144, 60.0).top1_at_epochs == pytest.approx(base)
    above = epochs_to_accuracy("alexnet_bn", 6144, 60.3)
    assert above.epochs == pytest.approx(100 + 25 * (60.3 - base) / 1.4)
    assert "log2(batch)" in above.method and "assumed the same" in above.method


@pytest.mark.parametrize("args, culprit", [
    (("alexnet_bn", 8192, 60.5), "above every value"),
    (("resnet50", 100, 70.0), "outside"),
    (("resnet50", 65536, 70.0), "outside"),
    (("vgg16", 256, 70.0), "no seed accuracy table"),
    (("googlenet", 3000, 70.0), "no accuracy-vs-epochs"),
    (("resnet50", 32768, 75.0), "not reached"),
    (("resnet50", 8192, 70.0, "icpp2018"), "outside"),
])
def test_time_to_accuracy_never_extrapolates(args, culprit: str) -> None:
    with pytest.raises(AccuracyError, match=culprit):
        epochs_to_accuracy(*args[:3], augmentation=args[3] if len(args) > 3 else None)


def test_every_seed_result_has_its_source_and_augmentation_regime() -> None:
    from analysis.accuracy import accuracy_tables, tables_for

    tables = accuracy_tables()
    for table in tables.values():
        assert table.source and table.augmentation in ("standard", "minimal", "extended", "icpp2018"), table
    assert [t.augmentation for t in tables_for("resnet50_v1")] == ["extended", "minimal", "icpp2018"]
    # ICPP 2018: 74.9 % top-1 in 64 epochs at 32K, with that paper's augmentation (the LARS paper's extended
    # regime reaches 72.5 % at 32K in 100 epochs and never 74.9 % there).
    icpp = epochs_to_accuracy("resnet50_v1", 32768, 74.9)
    assert (icpp.epochs, icpp.bound, icpp.augmentation) == (64, "exact", "icpp2018")
    assert "ImageNet Training in Minutes" in icpp.source
    with pytest.raises(AccuracyError, match="not reached"):
        epochs_to_accuracy("resnet50_v1", 32768, 74.9, augmentation="extended")
    # Each regime answers for itself: the fewest epochs across them is the default answer.
    extended = epochs_to_accuracy("resnet50", 16384, 74.0, augmentation="extended")
    with pytest.raises(AccuracyError, match="at or below|not reached|above"):
        epochs_to_accuracy("resnet50", 16384, 74.0, augmentation="minimal")
    assert epochs_to_accuracy("resnet50", 16384, 74.0).epochs == extended.epochs
    # AlexNet-BN's results: Table 3(b) by batch and Table 5(b) by epochs at 32K.
    alexnet_bn = tables["alexnet_bn"]
    assert [r.top1 for r in alexnet_bn.batch_rows] == [60.2, 60.4, 60.1, 59.3, 57.8]
    assert [r.top1 for r in alexnet_bn.epochs_rows] == [57.8, 59.2, 59.5, 59.5, 59.9]


def test_plan_for_the_demo_question_offers_the_seed_configuration() -> None:
    # ResNet-50 to 74.9 % on Stampede2 KNL within 2000 node-hours and 2-hour jobs: the seed paper's own run
    # (2048 KNL, 32K, 64 epochs, 14 min) must be among the answers, from the ICPP regime, near 14 minutes.
    result = plan("resnet50", "stampede2-knl", target_top1=74.9, budget_node_hours=2000, max_walltime="02:00:00")
    seed = [r for r in result.rows if (r.nodes, r.global_batch) == (2048, 32768)]
    assert len(seed) == 1 and seed[0].epochs == 64 and seed[0].augmentation == "icpp2018"
    assert 12 * 60 < seed[0].time_to_train_s < 16 * 60
    assert seed[0] in result.rows[:10] and seed[0].pareto


# ---------------------------------------------------------------- reproduce


def test_reproduce_hits_every_published_headline_within_ten_percent() -> None:
    result = reproduce()
    published = {(r.model, r.nodes, r.epochs): r.published_minutes for r in result.rows}
    assert published == {("alexnet_bn", 1024, 100.0): 11, ("resnet50_v1", 2048, 90.0): 20,
                         ("resnet50_v1", 2048, 64.0): 14}
    for row in result.rows:
        print(f"{row.label}: predicted {row.predicted_minutes:.2f} min, published {row.published_minutes} "
              f"({row.error:+.1%})")
        assert abs(row.error) <= 0.10, row
        # the same number `larscale predict` gives
        again = predict_point(row.model, row.machine, row.nodes, row.global_batch, row.epochs)
        assert again["time_to_train_s"] / 60 == pytest.approx(row.predicted_minutes)


# ---------------------------------------------------------------- planning


def test_pareto_mask_by_hand() -> None:
    time = [1, 2, 2, 3, 4]
    cost = [10, 5, 6, 5, 1]
    assert pareto_mask(time, cost).tolist() == [True, True, False, False, True]


def test_plan_ranks_feasible_configurations_and_chains_jobs() -> None:
    result = plan("resnet50", "stampede2-knl", target_top1=74.5, budget_node_hours=3000, max_walltime="01:00:00",
                  restart_overhead_s=100)
    assert result.rows
    walls = [r.wall_s for r in result.rows]
    assert walls == sorted(walls)
    for r in result.rows:
        assert r.node_hours <= 3000
        assert r.global_batch % (r.nodes * r.ranks_per_node) == 0
        assert r.jobs == max(1, math.ceil(r.time_to_train_s / (3600 - 100)))
        assert r.wall_s == pytest.approx(r.time_to_train_s + r.jobs * 100)
        assert epochs_to_accuracy("resnet50", r.global_batch, 74.5).epochs == r.epochs
    assert any(r.jobs > 1 for r in result.rows)
    front = result.front
    assert front
    for f in front:   # nobody dominates a front point
        assert not any(o.wall_s <= f.wall_s and o.node_hours <= f.node_hours
                       and (o.wall_s < f.wall_s or o.node_hours < f.node_hours) for o in result.rows)


def test_plan_bad_questions_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="above every value"):
        plan("resnet50", "stampede2-knl", target_top1=80)
    with pytest.raises(ValueError, match="beyond machine"):
        plan("resnet50", "stampede2-knl", epochs=90, max_nodes=10**6)
    with pytest.raises(ValueError, match="no configuration fits"):
        plan("resnet50", "stampede2-knl", epochs=90, budget_node_hours=0.001)


# ---------------------------------------------------------------- CLI and isolation


def _larscale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "larscale", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_cli_predict_json_has_the_stable_keys() -> None:
    proc = _larscale("predict", "--model", "resnet50", "--machine", "stampede2-knl", "--nodes", "2048",
                     "--global-batch", "32768", "--epochs", "90", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    (record,) = json.loads(proc.stdout)                 # a list, also of one configuration
    assert list(record)[2:2 + len(KEYS)] == list(KEYS)
    assert record == pytest.approx(predict_point("resnet50", "stampede2-knl", 2048, 32768, 90))


@pytest.mark.parametrize("args, culprit", [
    (["predict", "--model", "nope", "--machine", "local", "--nodes", "1", "--global-batch", "2"], "'nope'"),
    (["predict", "--model", "alexnet", "--machine", "nowhere", "--nodes", "1", "--global-batch", "2"], "'nowhere'"),
    (["predict", "--model", "alexnet", "--machine", "local", "--nodes", "2", "--global-batch", "2"], "beyond"),
    (["predict", "--model", "alexnet", "--machine", "stampede2-skx", "--nodes", "3", "--global-batch", "32"],
     "not divisible"),
    (["plan", "--model", "resnet50", "--machine", "stampede2-knl", "--target-top1", "99"], "above every value"),
    (["time-to-accuracy", "--model", "alexnet_bn", "--global-batch", "32768", "--target-top1", "61"],
     "above every value"),
])
def test_cli_bad_input_is_one_line_exit_2(args, culprit: str) -> None:
    proc = _larscale(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert culprit in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_reproduce_and_plan_write_tables_and_plots(tmp_path) -> None:
    proc = _larscale("reproduce", "--out", str(tmp_path / "repro"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "11" in proc.stdout and "46.9" in proc.stdout          # headline and a LARS table value
    for stem in ("reproduce_vs_published", "reproduce_breakdown", "reproduce_strong_scaling",
                 "reproduce_weak_scaling", "reproduce_time_to_train", "lars_accuracy_vs_batch"):
        for fmt in ("png", "svg"):
            assert (tmp_path / "repro" / f"{stem}.{fmt}").stat().st_size > 1000
    rows = json.loads((tmp_path / "repro" / "reproduce.json").read_text())["rows"]
    assert all(abs(r["error"]) <= 0.10 for r in rows)
    proc = _larscale("plan", "--model", "alexnet_bn", "--machine", "stampede2-skx", "--epochs", "100",
                     "--max-nodes", "256", "--out", str(tmp_path / "plan"))
    assert proc.returncode == 0, proc.stderr
    assert "Pareto" in proc.stdout
    assert (tmp_path / "plan" / "plan_pareto.svg").stat().st_size > 1000
    proc = _larscale("time-to-accuracy", "--model", "resnet50", "--global-batch", "16384", "--target-top1", "74.7",
                     "--plot", str(tmp_path / "tta"))
    assert proc.returncode == 0, proc.stderr
    assert "162.5 epochs" in proc.stdout and "Table 5(c)" in proc.stdout
    assert (tmp_path / "tta.png").exists()


def test_analysis_never_imports_torch_or_tensorflow() -> None:
    code = (
        "import importlib, pkgutil, sys, analysis\n"
        "for m in pkgutil.walk_packages(analysis.__path__, 'analysis.'):\n"
        "    if m.name != 'analysis.__main__': importlib.import_module(m.name)\n"
        "from analysis.predict import predict_point\n"
        "from analysis.reproduce import reproduce\n"
        "from analysis.plan import plan\n"
        "predict_point('resnet50', 'stampede2-knl', 4, 64)\n"
        "reproduce(make_plots=False)\n"
        "plan('alexnet_bn', 'stampede2-skx', target_top1=58)\n"
        "import larscale; larscale.build_parser(['analysis'], 'x')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'keras', 'tf_keras',"
        " 'horovod')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_small_image_runs_use_the_recomputed_table() -> None:
    # ResNet-50 at 32 px does (32/224)^2 of the 224-px convolution work, give or take the first layer's padding.
    # (The FLOP model, proportional to the work; the roofline adds per-step costs that do not shrink.)
    flops_only = PerfParams.from_machine(load_machine("local")).replace(compute_model="sustained")
    small = predict_point("resnet50", "local", 1, 8, 1, image_size=32, params=flops_only)
    native = predict_point("resnet50", "local", 1, 8, 1, params=flops_only)
    assert 30 < native["compute_s"] / small["compute_s"] < 60
    assert 30 < load_workload("resnet50").flops_per_image / load_workload("resnet50", 32).flops_per_image < 60
    proc = _larscale("predict", "--model", "alexnet", "--machine", "local", "--nodes", "1", "--global-batch", "2",
                     "--image-size", "32")
    assert proc.returncode == 2 and "227" in proc.stderr
