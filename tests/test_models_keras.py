"""Keras networks against the analytical tables and against the PyTorch networks.

Parameters: the tables count trainable parameters. Keras' ``count_params`` also counts BatchNorm's moving mean
and variance (non-trainable weights; PyTorch keeps them as buffers), so it must equal the table's parameters plus
2 × the channels of every BatchNorm layer, while the trainable weights must equal the table exactly.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
from models.tables import layer_table, load_table  # noqa: E402

NUM_CLASSES = 1000


def trainable_count(weights) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


def channels_last(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape if len(shape) == 1 else (*shape[1:], shape[0])


@pytest.fixture(scope="module", params=models.names())
def native(request) -> tuple[str, tf.keras.Model]:
    """Each model at its native size, built once; module scope makes pytest run its tests together."""
    tf.keras.backend.clear_session()
    yield request.param, models.get(request.param, framework="tensorflow", num_classes=NUM_CLASSES)
    tf.keras.backend.clear_session()  # one model alive at a time: VGG-16 alone holds 0.55 GB of weights


def test_parameter_counts_equal_table_and_torch(native: tuple[str, tf.keras.Model]) -> None:
    name, model = native
    table = load_table(name)
    params = sum(r.params for r in table)
    assert trainable_count(model.trainable_weights) == params
    running_stats = sum(2 * r.output_shape[0] for r in table if r.kind == "batchnorm")
    assert model.count_params() == params + running_stats
    assert trainable_count(model.non_trainable_weights) == running_stats
    torch_model = models.get(name, framework="torch", num_classes=NUM_CLASSES)
    assert sum(p.numel() for p in torch_model.parameters()) == trainable_count(model.trainable_weights)


def test_every_table_layer_exists_with_its_shape_and_parameters(native: tuple[str, tf.keras.Model]) -> None:
    name, model = native
    for row in load_table(name):
        layer = model.get_layer(row.name)
        assert tuple(layer.output_shape[1:]) == channels_last(row.output_shape), row.name
        assert trainable_count(layer.trainable_weights) == row.params, row.name


def test_forward_backward_batch_of_two_at_native_size(native: tuple[str, tf.keras.Model]) -> None:
    name, model = native
    size = models.input_size(name)
    images = tf.random.stateless_normal((2, size, size, 3), seed=(1, 2))
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(tf.reduce_logsumexp(logits, axis=1))
    gradients = tape.gradient(loss, model.trainable_weights)
    assert tuple(logits.shape) == (2, NUM_CLASSES)
    assert all(g is not None and bool(tf.reduce_all(tf.math.is_finite(g))) for g in gradients)


def copy_torch_weights(torch_model: torch.nn.Module, keras_model: tf.keras.Model, name: str, size: int) -> None:
    """Give the Keras model the PyTorch model's weights (and BatchNorm running statistics)."""
    table = {r.name: r for r in layer_table(name, size, num_classes=10)}
    names = [r.name for r in layer_table(name, size, num_classes=10)][::-1]  # forward order
    for module_name, module in torch_model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            weights = [module.weight.detach().numpy().transpose(2, 3, 1, 0)]  # (O, I/g, kh, kw) -> (kh, kw, I/g, O)
            if module.bias is not None:
                weights.append(module.bias.detach().numpy())
        elif isinstance(module, torch.nn.Linear):
            kernel = module.weight.detach().numpy()  # (out, in)
            previous = table[names[names.index(module_name) - 1]].output_shape
            if len(previous) == 3:  # flattened feature map: PyTorch flattens (C, H, W), Keras (H, W, C)
                kernel = kernel.reshape(kernel.shape[0], *previous).transpose(0, 2, 3, 1).reshape(kernel.shape[0], -1)
            weights = [kernel.T, module.bias.detach().numpy()]
        elif isinstance(module, torch.nn.BatchNorm2d):
            stats = [module.running_mean.numpy(), module.running_var.numpy()]
            affine = [module.weight.detach().numpy(), module.bias.detach().numpy()] if module.affine else []
            weights = affine + stats
        else:
            continue
        keras_model.get_layer(module_name).set_weights(weights)


@pytest.mark.parametrize(("name", "size"), [
    ("alexnet", None), ("alexnet_bn", None), ("resnet50", 64), ("resnet50_v1", 56), ("googlenet", 75),
    pytest.param("vgg16", None, marks=pytest.mark.slow),
])
def test_keras_and_torch_compute_the_same_function(name: str, size: int | None) -> None:
    """Same weights → same logits: padding, grouping, LRN, ceil-mode pooling and flatten order all agree.

    Odd sizes (75: pooled maps of 19, 10, 5, 3) exercise the ceil-mode padding of GoogLeNet's pools.
    """
    size = size or models.input_size(name)
    torch.manual_seed(0)
    torch_model = models.get(name, framework="torch", num_classes=10, image_size=size).eval()
    with torch.no_grad():
        for module in torch_model.modules():  # non-trivial running statistics and affine parameters
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                if module.affine:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, 0.0, module.in_features ** -0.5)
    tf.keras.backend.clear_session()
    keras_model = models.get(name, framework="tensorflow", num_classes=10, image_size=size)
    copy_torch_weights(torch_model, keras_model, name, size)
    # Caffe's pixel range (0..255 less the mean): large enough activations that LRN's α matters.
    images = (torch.rand(2, 3, size, size) - 0.5) * 255
    with torch.no_grad():
        expected = torch_model(images).numpy()
    got = keras_model(images.numpy().transpose(0, 2, 3, 1), training=False).numpy()
    assert np.abs(expected).max() > 1e-3  # a meaningful signal reaches the logits
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_keras_models_at_other_sizes() -> None:
    tf.keras.backend.clear_session()
    model = models.get("googlenet", framework="tensorflow", num_classes=7, image_size=31)
    assert tuple(model.output_shape) == (None, 7)
    assert tuple(model.get_layer("inception_5b.concat").output_shape) == (None, 1, 1, 1024)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "inception_v3"}, "known models: alexnet, alexnet_bn"),
    ({"name": "alexnet_bn", "image_size": 224}, "image_size must be 227, got 224"),
    ({"name": "googlenet", "image_size": 30}, "too small for googlenet"),
    ({"name": "resnet50_v1", "num_classes": 0}, "num_classes must be a positive integer, got 0"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        models.get(framework="tensorflow", **kwargs)


def test_fixed_head_model_refuses_wrong_input_size() -> None:
    tf.keras.backend.clear_session()
    model = models.get("alexnet", framework="tensorflow", num_classes=10)
    with pytest.raises(ValueError, match="incompatible"):
        model(tf.zeros((1, 224, 224, 3)))
