"""The vectorised model equals the plain one-configuration-at-a-time model (analysis/predict_plain.py)."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.params import PerfParams
from analysis.predict import predict_from
from analysis.predict_plain import predict_plain
from analysis.workload import load_workload
from larscale.machine import load_machine

KEYS = ("forward_s", "backward_s", "overhead_s", "compute_s", "comm_total_s", "comm_exposed_s", "jitter_s",
        "buckets", "data_s", "iteration_s", "epoch_s", "time_to_train_s", "images_per_s", "scaling_efficiency",
        "node_hours", "iteration_s_low", "iteration_s_high", "images_per_s_low", "node_hours_high")


def cases():
    knl = PerfParams.from_machine(load_machine("stampede2-knl"))
    local = PerfParams.from_machine(load_machine("local")).replace(max_nodes=None, data_images_per_s_per_node=400.0,
                                                                   copy_s_per_byte=1.4e-10)
    h100 = PerfParams.from_machine(load_machine("dgx-h100"), "bf16")
    compiled = PerfParams.from_machine(load_machine("dgx-h100"), "bf16", compute_mode="compiled").replace(
        overlap="none", gradient_scale=0.5, bucket_overhead_s=2e-4, jitter_included_ranks=2)
    measured = h100.replace(measured_images_per_s={"alexnet": {64: 9000.0, 256: 15000.0}})
    return [("resnet50_v1", knl), ("alexnet_bn", local), ("resnet50", h100), ("vgg16", compiled),
            ("alexnet", measured), ("googlenet", h100.replace(cycle_s=3.5e-3, interference=0.5)),
            ("resnet50", h100.replace(jitter_cv=0.04, jitter_s_per_image=8e-5, jitter_included_ranks=2))]


@pytest.mark.parametrize("model, params", cases(), ids=lambda v: v if isinstance(v, str) else v.machine)
def test_vectorised_equals_plain(model: str, params: PerfParams) -> None:
    workload = load_workload(model)
    rng = np.random.default_rng(11)
    q = params.default_ranks_per_node
    nodes = rng.choice([1, 2, 3, 8, 64, 1000], 12)
    per_rank = rng.choice([1, 4, 16, 64, 256], 12)
    grid = predict_from(workload, params, nodes, nodes * q * per_rank, 90.0, check=False)
    for i in range(nodes.size):
        plain = predict_plain(workload, params, int(nodes[i]), int(nodes[i] * q * per_rank[i]), 90.0)
        for key in KEYS:
            assert plain[key] == pytest.approx(float(getattr(grid, key)[i]), rel=1e-9, abs=1e-15), key
