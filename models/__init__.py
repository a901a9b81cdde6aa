"""Network definitions (PyTorch and Keras) and their per-layer parameter/FLOP tables.

The registry:

    import models
    models.names()                    # ['alexnet', 'alexnet_bn', 'resnet50', 'resnet50_v1', 'googlenet', 'vgg16']
    models.input_size("alexnet")      # 227 (224 for the others)
    net = models.get("resnet50", framework="torch", num_classes=10, image_size=64)

This module and ``models.tables`` import neither torch nor tensorflow (``analysis/`` reads the tables); the
framework is imported by :func:`get` when a network is built.
"""

from __future__ import annotations

from typing import Any

from models.arch import ARCHITECTURES, UnknownModelError, architecture, check_num_classes, resolve_image_size

__all__ = ["FRAMEWORKS", "UnknownModelError", "describe", "get", "input_size", "names"]

FRAMEWORKS = ("torch", "tensorflow")


def names() -> list[str]:
    """The registered model names."""
    return list(ARCHITECTURES)


def input_size(name: str) -> int:
    """The native (square) input size of ``name``: 227 for the AlexNets, 224 for the others."""
    return architecture(name).input_size


def describe(name: str) -> str:
    """One line saying which variant of the network ``name`` is."""
    return architecture(name).description


def get(name: str, framework: str = "torch", num_classes: int = 1000, image_size: int | None = None,
        **options: Any) -> Any:
    """Build the network ``name`` for ``framework`` ("torch" → ``nn.Module``, "tensorflow" → ``tf.keras.Model``).

    ``image_size`` None means the native size. Fixed-head models (alexnet, alexnet_bn, vgg16) accept only their
    native size; ResNet-50 and GoogLeNet (global average pooling) accept any size at which no layer shrinks
    below one pixel (GoogLeNet: 31 and up).
    A PyTorch module takes NCHW input and adapts to the size it is fed; a Keras model is built for NHWC input of
    ``image_size``. ``options`` go to the network (ResNet-50: ``zero_init_residual``). Bad names, sizes or class
    counts raise ValueError naming the culprit.
    """
    arch = architecture(name)
    num_classes = check_num_classes(num_classes)
    size = resolve_image_size(name, image_size)
    if not arch.fixed_head:
        from models.arch import layer_table

        layer_table(name, size, num_classes)  # raises when the image is too small for the network
    if framework == "torch":
        from models import torch_nets

        return torch_nets.build(name, num_classes, **options)
    if framework in ("tensorflow", "tf", "keras"):
        from models import keras_nets

        return keras_nets.build(name, num_classes, size, **options)
    raise ValueError(f"unknown framework {framework!r}; known frameworks: {', '.join(FRAMEWORKS)}")
