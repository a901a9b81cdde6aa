"""Achieved bandwidth, NIC sharing, host staging, gradient width, interference and the wait for the slowest rank."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from analysis.comm import allreduce_affine
from analysis.params import PerfParams, collective_settings
from analysis.predict import expected_max_normal, predict, predict_from
from analysis.workload import load_workload
from larscale.machine import load_machine, parse_machine


def gpu_profile(**collectives) -> dict:
    doc = load_machine("dgx1-v100").to_dict()
    doc["network"]["collectives"] = {**doc["network"].get("collectives", {}), **collectives}
    return doc


def test_gpu_links_run_at_their_published_achieved_share_cpu_links_at_their_own() -> None:
    gpu = collective_settings(load_machine("dgx1-v100"))
    assert (gpu.intra_efficiency, gpu.inter_efficiency) == (0.8, 0.96)
    params = PerfParams.from_machine(load_machine("dgx1-v100"))
    peak = load_machine("dgx1-v100").network.inter_node.beta_s_per_byte
    assert params.link.beta_inter_s_per_byte == pytest.approx(peak / 0.96)
    cpu = PerfParams.from_machine(load_machine("stampede2-knl"))
    assert cpu.link.beta_inter_s_per_byte == load_machine("stampede2-knl").network.inter_node.beta_s_per_byte
    assert (cpu.jitter_cv, cpu.interference, cpu.bucket_overhead_s) == (0.0, 0.0, 0.0)


def test_host_staging_caps_a_fast_nic_and_leaves_a_slow_one() -> None:
    fast = gpu_profile(gpudirect_rdma=False, nics_per_node=1)
    fast["network"]["inter_node"]["bandwidth_gbps"] = 200          # one HDR NIC: 25 GB/s
    assert collective_settings(parse_machine(fast)).inter_efficiency == pytest.approx(16 / 25)
    slow = gpu_profile(gpudirect_rdma=False, nics_per_node=1)
    slow["network"]["inter_node"]["bandwidth_gbps"] = 25           # 3.1 GB/s: under the staging cap
    assert collective_settings(parse_machine(slow)).inter_efficiency == pytest.approx(0.96)


def test_nics_shared_by_eight_gpus_make_the_allreduce_nic_bound() -> None:
    w = load_workload("resnet50")
    one_nic = gpu_profile()
    one_nic["network"]["inter_node"]["bandwidth_gbps"] = 100
    four = predict(w, load_machine("dgx1-v100"), 4, 32 * 128, 1).record(0)
    one = predict(w, parse_machine(one_nic), 4, 32 * 128, 1).record(0)
    bytes_on_nic = 2 * 31 / 32 * w.gradient_bytes                 # NCCL's rings through each node's NICs
    assert one["buckets"] == four["buckets"]                        # same latencies: the difference is bytes
    extra = bytes_on_nic * (1 / (100e9 / 8 * 0.96) - 1 / (400e9 / 8 * 0.96))
    assert one["comm_total_s"] - four["comm_total_s"] == pytest.approx(extra, rel=1e-6)


def test_sixteen_bit_gradients_halve_the_bytes_on_the_wire() -> None:
    w = load_workload("alexnet")
    full = predict(w, parse_machine(gpu_profile()), 8, 8 * 8 * 64, 1).record(0)
    half = predict(w, parse_machine(gpu_profile(gradient_dtype="fp16")), 8, 8 * 8 * 64, 1).record(0)
    assert half["buckets"] == full["buckets"]
    params = PerfParams.from_machine(parse_machine(gpu_profile()))
    latency, _ = allreduce_affine("nccl", 8, 8, params.link)
    bandwidth_part = full["comm_total_s"] - full["buckets"] * float(latency)
    assert half["comm_total_s"] == pytest.approx(full["comm_total_s"] - bandwidth_part / 2, rel=1e-6)


def test_expected_maximum_of_normals_against_simulation() -> None:
    assert float(expected_max_normal(1)) == 0.0
    values = expected_max_normal(np.array([2, 8, 64, 1024]))
    assert np.all(np.diff(values) > 0)
    rng = np.random.default_rng(1)
    for n, value in zip((2, 8, 64, 1024), values, strict=True):
        simulated = rng.standard_normal((4000, n)).max(axis=1).mean()
        assert value == pytest.approx(simulated, rel=0.06)


def test_the_slowest_rank_and_interference_lengthen_the_step() -> None:
    w = load_workload("resnet50")
    base = PerfParams.from_machine(load_machine("dgx1-v100")).replace(jitter_cv=0.0, interference=0.0,
                                                                      jitter_s_per_image=0.0)
    plain = predict_from(w, base, 4, 32 * 64, 1).record(0)
    jittery = predict_from(w, base.replace(jitter_cv=0.05), 4, 32 * 64, 1).record(0)
    assert jittery["jitter_s"] == pytest.approx(plain["compute_s"] * 0.05 * float(expected_max_normal(32)))
    assert jittery["iteration_s"] == pytest.approx(plain["iteration_s"] + jittery["jitter_s"])
    one = predict_from(w, base.replace(jitter_cv=0.05), 1, 64, 1, ranks_per_node=1).record(0)
    assert one["jitter_s"] == 0.0
    slowed = predict_from(w, base.replace(interference=0.25), 4, 32 * 64, 1).record(0)
    hidden = plain["comm_total_s"] - plain["comm_exposed_s"]
    assert slowed["comm_exposed_s"] == pytest.approx(plain["comm_exposed_s"] + 0.25 * hidden)


def test_the_per_image_spread_joins_the_compute_share_in_quadrature() -> None:
    w = load_workload("resnet50")
    base = PerfParams.from_machine(load_machine("dgx1-v100")).replace(jitter_cv=0.0, interference=0.0,
                                                                      jitter_s_per_image=0.0)
    plain = predict_from(w, base, 4, 32 * 64, 1).record(0)
    both = predict_from(w, base.replace(jitter_cv=0.05, jitter_s_per_image=80e-6), 4, 32 * 64, 1).record(0)
    sigma = np.hypot(0.05 * plain["compute_s"], 80e-6 * 64)
    assert both["jitter_s"] == pytest.approx(sigma * float(expected_max_normal(32)))
    assert both["iteration_s"] == pytest.approx(plain["iteration_s"] + both["jitter_s"])
    # The host's per-image spread does not depend on the GPU's compute time (mixed precision shortens that).
    host = predict_from(w, base.replace(jitter_s_per_image=80e-6), 4, 32 * 64, 1).record(0)
    assert host["jitter_s"] == pytest.approx(80e-6 * 64 * float(expected_max_normal(32)))
    alone = predict_from(w, base.replace(jitter_s_per_image=80e-6), 1, 64, 1, ranks_per_node=1).record(0)
    assert alone["jitter_s"] == 0.0


def test_the_per_image_spread_is_a_profile_field_and_no_kind_default() -> None:
    assert PerfParams.from_machine(parse_machine(gpu_profile())).jitter_s_per_image == 0.0
    stated = gpu_profile(step_jitter_us_per_image=50.0)
    assert PerfParams.from_machine(parse_machine(stated)).jitter_s_per_image == pytest.approx(50e-6)


def test_bucket_overhead_is_paid_per_bucket_and_only_with_a_collective() -> None:
    w = load_workload("resnet50")
    base = PerfParams.from_machine(load_machine("dgx1-v100"))
    cost = dataclasses.replace(base, bucket_overhead_s=1e-3)
    a = predict_from(w, base, 2, 16 * 64, 1).record(0)
    b = predict_from(w, cost, 2, 16 * 64, 1).record(0)
    assert b["comm_total_s"] >= a["comm_total_s"] + 1e-3 * min(a["buckets"], b["buckets"]) - 1e-9
    alone = predict_from(w, cost, 1, 64, 1, ranks_per_node=1).record(0)
    assert alone["comm_total_s"] == 0.0


@pytest.mark.parametrize("field, value, culprit", [
    ("interference", 1.5, "network.collectives.interference"),
    ("intra_efficiency", 0.0, "network.collectives.intra_efficiency"),
    ("gradient_dtype", "fp8", "network.collectives.gradient_dtype"),
])
def test_bad_collectives_fields_are_named(field, value, culprit) -> None:
    with pytest.raises(ValueError, match=culprit):
        parse_machine(gpu_profile(**{field: value}))
