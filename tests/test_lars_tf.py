"""scaling.optim_tf: the TensorFlow LARS gives the PyTorch LARS's weights, works in Keras and in custom loops."""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

tf = pytest.importorskip("tensorflow")

from scaling.optim import LARS as TorchLARS  # noqa: E402
from scaling.optim_tf import LARS, KerasLARS, LARSModule, uses_trust_ratio  # noqa: E402

# TF kernel layout (HWIO) for the conv weight; PyTorch does not care about the layout of a tensor it gets as is.
SHAPES = [(3, 3, 4, 8), (8,), (32, 16), (16,), (16, 10), (10,)]


def problem(steps: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    start = [rng.standard_normal(s).astype(np.float32) * 0.5 for s in SHAPES]
    start[1][:] = 0.0  # zero-initialised bias
    grads = []
    for t in range(steps):
        step = [rng.standard_normal(s).astype(np.float32) * (0.05 + 0.05 * i) for i, s in enumerate(SHAPES)]
        if t % 5 == 2:
            step[2][:] = 0.0  # a zero gradient
        grads.append(step)
    lrs = [0.3 * (t + 1) / 4 if t < 4 else 0.3 * (1 - (t - 4) / 16) ** 2 for t in range(steps)]
    return start, grads, lrs


def torch_weights(start, grads, lrs, **kwargs) -> list[np.ndarray]:
    params = [torch.nn.Parameter(torch.tensor(w)) for w in start]
    opt = TorchLARS(params, lr=lrs[0], **kwargs)
    for lr, step in zip(lrs, grads, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(params, step, strict=True):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy() for p in params]


def tf_weights(cls, start, grads, lrs, **kwargs) -> list[np.ndarray]:
    variables = [tf.Variable(w) for w in start]
    opt = cls(learning_rate=lrs[0], **kwargs)
    opt.build(variables)

    @tf.function
    def apply(step, lr):
        opt.learning_rate.assign(lr)
        opt.apply_gradients(zip(step, variables, strict=True))

    for lr, step in zip(lrs, grads, strict=True):
        apply([tf.constant(g) for g in step], tf.constant(lr, tf.float32))
    assert int(opt.iterations.numpy()) == len(lrs)
    return [v.numpy() for v in variables]


@pytest.mark.parametrize("cls", [KerasLARS, LARSModule], ids=["keras", "module"])
@pytest.mark.parametrize("kwargs", [
    {"momentum": 0.9, "weight_decay": 5e-4, "trust_coefficient": 0.02},
    {"momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 2.0, "clip": True},
    {"momentum": 0.0, "weight_decay": 1e-4, "trust_coefficient": 0.05},
], ids=["default", "clip", "no-momentum"])
def test_same_weights_as_pytorch_after_20_steps(cls, kwargs):
    start, grads, lrs = problem()
    expected = torch_weights(start, grads, lrs, **kwargs)
    got = tf_weights(cls, start, grads, lrs, **kwargs)
    assert max(np.abs(e).max() for e in expected) < 5  # weights of order 1: the tolerance means something
    for e, g, w0 in zip(expected, got, start, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
        assert np.abs(g - w0).max() > 1e-3  # every tensor moved, the zero-initialised bias too


def test_defaults_match_pytorch():
    import inspect

    torch_defaults = inspect.signature(TorchLARS).parameters
    for cls in (KerasLARS, LARSModule):
        tf_defaults = inspect.signature(cls).parameters
        for name in ("momentum", "weight_decay", "trust_coefficient", "clip", "exclude_1d"):
            assert tf_defaults[name].default == torch_defaults[name].default, (cls, name)
    assert LARS is KerasLARS and issubclass(KerasLARS, tf.keras.optimizers.Optimizer)


def test_keras_fit_config_round_trip_and_weight_decay_is_lars_own():
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.layers.Input((8,)), tf.keras.layers.Dense(16, activation="relu"),
                                 tf.keras.layers.Dense(3)])
    opt = KerasLARS(learning_rate=1.0, weight_decay=1e-4, trust_coefficient=0.01)
    model.compile(optimizer=opt, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    history = model.fit(x, y, batch_size=64, epochs=8, verbose=0)
    assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]
    config = opt.get_config()
    assert config["weight_decay"] == 1e-4 and config["trust_coefficient"] == 0.01
    clone = KerasLARS.from_config(config)
    assert clone.get_config() == config
    assert clone.weight_decay is None  # the Keras base class applies no decoupled decay of its own
    assert len(opt.variables) == 1 + len(model.trainable_variables)  # iterations + one velocity per variable


def test_exclusion_rules():
    kernel = tf.Variable(tf.ones((2, 2)), name="dense/kernel")
    bias = tf.Variable(tf.ones((2,)), name="dense/bias")
    scale = tf.Variable(tf.ones((2, 2)), name="embedding/table")
    assert uses_trust_ratio(kernel) and not uses_trust_ratio(bias)
    assert uses_trust_ratio(bias, exclude_1d=False)
    assert not uses_trust_ratio(scale, exclude_names=["embedding"])
    opt = LARSModule(learning_rate=0.1, weight_decay=0.1, exclude_names=["embedding"])
    opt.apply_gradients([(tf.fill((2, 2), 0.5), scale), (tf.fill((2,), 0.5), bias)])
    np.testing.assert_allclose(scale.numpy(), np.full((2, 2), 1 - 0.05), rtol=1e-6)  # plain SGD, no decay
    np.testing.assert_allclose(bias.numpy(), np.full((2,), 1 - 0.05), rtol=1e-6)


@pytest.mark.parametrize("kwargs, word", [({"learning_rate": -1.0}, "learning_rate"),
                                          ({"learning_rate": 0.1, "momentum": 1.5}, "momentum"),
                                          ({"learning_rate": 0.1, "weight_decay": -1.0}, "weight_decay"),
                                          ({"learning_rate": 0.1, "trust_coefficient": 0.0}, "trust_coefficient"),
                                          ({"learning_rate": 0.1, "exclude_names": "bias"}, "exclude_names")])
def test_invalid_hyperparameters_name_the_culprit(kwargs, word):
    for cls in (KerasLARS, LARSModule):
        with pytest.raises(ValueError, match=word):
            cls(**kwargs)


def test_trust_ratio_stays_fp32_under_mixed_bfloat16():
    """A ``--precision bf16`` TensorFlow step (Keras policy mixed_bfloat16) computes in bf16 but keeps fp32 weights
    and gradients, and LARS's step stays fp32: within 1e-5 of the float64 update from the same gradients (observed
    ~1e-7; a trust ratio from bf16 norms would be off by ~1e-3)."""
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        tf.keras.utils.set_random_seed(0)
        model = tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(8, 8, 3)),
                                     tf.keras.layers.Conv2D(8, 3), tf.keras.layers.Flatten(),
                                     tf.keras.layers.Dense(4)])
        with tf.GradientTape() as tape:
            logits = model(tf.random.normal((4, 8, 8, 3)), training=True)
            loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
                tf.constant([0, 1, 2, 3]), tf.cast(logits, tf.float32))
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert logits.dtype == tf.bfloat16
    assert all(v.dtype == g.dtype == tf.float32 for v, g in zip(variables, grads, strict=True))
    before = [v.numpy().astype(np.float64) for v in variables]
    lr, eta, wd = 0.5, 0.5, 1e-3
    LARS(learning_rate=lr, momentum=0.9, weight_decay=wd, trust_coefficient=eta).apply_gradients(
        zip(grads, variables, strict=True))
    for v, w, g in zip(variables, before, [g.numpy().astype(np.float64) for g in grads], strict=True):
        if w.ndim > 1:
            expected = w - lr * eta * np.linalg.norm(w) / (np.linalg.norm(g) + wd * np.linalg.norm(w)) * (g + wd * w)
        else:
            expected = w - lr * g
        error = np.abs(v.numpy() - expected).max() / np.abs(w - expected).max()
        assert v.dtype == tf.float32 and error <= 1e-5, (v.name, error)
