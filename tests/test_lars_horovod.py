"""Under 2-rank Horovod, LARS over averaged gradients equals single-process LARS on the full batch.

The test starts real ranks (``mpirun``, Horovod's MPI controller) running this file as a program. Every rank
holds half of a fixed full batch; ``hvd.DistributedOptimizer(LARS)`` (PyTorch) and ``hvd.DistributedGradientTape``
with the TensorFlow LARS average the half-batch gradients; rank 0 then replays the same steps in one process on the
full batch and prints the largest weight difference. float64 in PyTorch (the average of two half-batch means
equals the full-batch mean up to rounding), float32 in TensorFlow.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

STEPS, FULL_BATCH, FEATURES, CLASSES = 12, 16, 10, 4


def batch(dtype_name: str):
    """The full batch (identical on every rank: fixed seed)."""
    import numpy as np

    rng = np.random.default_rng(7)
    x = rng.standard_normal((FULL_BATCH, FEATURES)).astype(dtype_name)
    y = rng.integers(0, CLASSES, FULL_BATCH)
    return x, y


def lr_at(step: int) -> float:
    return 2.0 * (step + 1) / 4 if step < 4 else 2.0 * (1 - (step - 4) / STEPS) ** 2


def torch_worker() -> None:
    import horovod.torch as hvd
    import torch

    from scaling.optim_fast import FastLARS as LARS  # what the trainer runs

    hvd.init()
    torch.set_num_threads(1)
    x_np, y_np = batch("float64")
    x, y = torch.tensor(x_np), torch.tensor(y_np)

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, CLASSES)).double()
        torch.nn.init.zeros_(model[0].bias)  # zero-initialised bias: must move under LARS
        return model, LARS(model.parameters(), lr=lr_at(0), momentum=0.9, weight_decay=1e-3,
                           trust_coefficient=0.05)

    def train(model, opt, xs, ys):
        for step in range(STEPS):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs), ys).backward()
            opt.step()

    model, base = model_and_optimizer()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(), op=hvd.Average)
    half = FULL_BATCH // hvd.size()
    shard = slice(hvd.rank() * half, (hvd.rank() + 1) * half)
    train(model, opt, x[shard], y[shard])
    # The optimizer's state broadcasts (tensors and Python ints) and matches on every rank. The wrapper holds the
    # state that training updated: hvd.DistributedOptimizer builds a new optimizer that shares only param_groups
    # with `base`, so `base.state` stays empty.
    assert not base.state and opt.state
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    state_sum = sum(float(t.sum()) for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    states = hvd.allgather_object(state_sum)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    all_weights = hvd.allgather_object(weights)
    report = {"rank": hvd.rank(), "size": hvd.size(), "framework": "torch",
              "ranks_agree": max(float((w - all_weights[0]).abs().max()) for w in all_weights),
              "states_agree": max(abs(s - states[0]) for s in states)}
    if hvd.rank() == 0:
        single, single_opt = model_and_optimizer()
        train(single, single_opt, x, y)
        reference = torch.cat([p.detach().reshape(-1) for p in single.parameters()])
        start, _ = model_and_optimizer()
        initial = torch.cat([p.detach().reshape(-1) for p in start.parameters()])
        report["max_diff"] = float((weights - reference).abs().max())
        report["moved"] = float((weights - initial).abs().max())
        report["bias_moved"] = float(single[0].bias.detach().abs().max())
    print("LARSHVD " + json.dumps(report), flush=True)


def tf_worker() -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import horovod.tensorflow as hvd
    import numpy as np
    import tensorflow as tf

    from scaling.optim_tf import LARS

    hvd.init()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    x_np, y_np = batch("float32")

    def model_and_optimizer():
        tf.keras.utils.set_random_seed(0)
        model = tf.keras.Sequential([tf.keras.layers.Input((FEATURES,)),
                                     tf.keras.layers.Dense(8, activation="tanh"), tf.keras.layers.Dense(CLASSES)])
        opt = LARS(learning_rate=lr_at(0), momentum=0.9, weight_decay=1e-3, trust_coefficient=0.05)
        opt.build(model.trainable_variables)
        return model, opt

    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def train(model, opt, xs, ys, distributed):
        @tf.function
        def step(lr):
            with tf.GradientTape() as tape:
                loss = loss_fn(ys, model(xs, training=True))
            if distributed:
                tape = hvd.DistributedGradientTape(tape, op=hvd.Average)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.learning_rate.assign(lr)
            opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))

        for t in range(STEPS):
            step(tf.constant(lr_at(t), tf.float32))

    model, opt = model_and_optimizer()
    hvd.broadcast_variables(model.variables, root_rank=0)
    hvd.broadcast_variables(opt.variables, root_rank=0)
    half = FULL_BATCH // hvd.size()
    shard = slice(hvd.rank() * half, (hvd.rank() + 1) * half)
    train(model, opt, tf.constant(x_np[shard]), tf.constant(y_np[shard]), distributed=True)
    weights = np.concatenate([w.reshape(-1) for w in model.get_weights()])
    all_weights = hvd.allgather_object(weights)
    report = {"rank": hvd.rank(), "size": hvd.size(), "framework": "tensorflow",
              "ranks_agree": float(max(np.abs(w - all_weights[0]).max() for w in all_weights))}
    if hvd.rank() == 0:
        single, single_opt = model_and_optimizer()
        initial = np.concatenate([w.reshape(-1) for w in single.get_weights()])
        train(single, single_opt, tf.constant(x_np), tf.constant(y_np), distributed=False)
        reference = np.concatenate([w.reshape(-1) for w in single.get_weights()])
        report["max_diff"] = float(np.abs(weights - reference).max())
        report["moved"] = float(np.abs(weights - initial).max())
    print("LARSHVD " + json.dumps(report), flush=True)


def _reports(framework: str) -> list[dict]:
    from tests.conftest import run_ranks, tagged_json

    proc = run_ranks(2, [os.path.abspath(__file__), framework], controller="mpi", timeout=300)
    reports = tagged_json(proc.stdout, "LARSHVD")
    assert sorted(r["rank"] for r in reports) == [0, 1], proc.stdout[-2000:] + proc.stderr[-2000:]
    return reports


@pytest.mark.slow
def test_two_rank_horovod_torch_lars_equals_single_process_full_batch():
    reports = _reports("torch")
    root = next(r for r in reports if r["rank"] == 0)
    assert all(r["size"] == 2 and r["ranks_agree"] == 0.0 and r["states_agree"] == 0.0 for r in reports)
    assert root["moved"] > 1e-2 and root["bias_moved"] > 1e-3
    assert root["max_diff"] < 1e-12, root


@pytest.mark.slow
def test_two_rank_horovod_tensorflow_lars_equals_single_process_full_batch():
    reports = _reports("tensorflow")
    root = next(r for r in reports if r["rank"] == 0)
    assert all(r["size"] == 2 and r["ranks_agree"] == 0.0 for r in reports)
    assert root["moved"] > 1e-2
    assert root["max_diff"] < 1e-5, root


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    {"torch": torch_worker, "tensorflow": tf_worker}[sys.argv[1]]()
