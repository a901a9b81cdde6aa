"""Keras (tf.keras = tf-keras, Keras 2) definitions of the six networks: functional models on NHWC input.

Use :func:`models.get` with ``framework="tensorflow"``. Every layer that appears in the per-layer tables has the
table's name (e.g. ``layer2.0.conv2``); helper layers that the tables do not list (explicit padding, flatten)
are named ``<layer>.pad`` / ``flatten``. The models output logits.

The layers mirror the PyTorch definitions exactly:

- PyTorch pads convolutions symmetrically, while Keras' ``padding="same"`` pads a strided convolution on the
  right only; strided or non-"same" convolutions therefore get an explicit ``ZeroPadding2D`` and run "valid".
- Max pooling with padding (ResNet's stem) or Caffe's ceil rounding (GoogLeNet) is a ``ZeroPadding2D`` that
  adds exactly the pixels the PyTorch windows reach, followed by a "valid" pool. Zero padding equals PyTorch's
  −∞ padding because every padded pool in these networks follows a ReLU (or an LRN of one): inputs are ≥ 0.
- Caffe's LRN (local_size 5, α 1e-4, β 0.75, k 1) divides α by the window size; ``tf.nn.local_response_
  normalization`` does not, and takes a radius: depth_radius 2, alpha 1e-4/5, beta 0.75, bias 1.
- BatchNorm: ε 1e-5 and moving-average momentum 0.9 (PyTorch's 0.1). Its moving mean and variance are
  non-trainable weights, so ``model.count_params()`` = trainable parameters + 2 × BN channels.
- Initialisation as in ``models.torch_nets``: He-normal over fan-out for convolutions, N(0, 0.01) for the
  fully-connected layers, zero biases.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.keras = tf-keras (Keras 2): Horovod needs tf.Variables

import tensorflow as tf  # noqa: E402

from models.arch import (  # noqa: E402
    GOOGLENET_INCEPTIONS,
    GOOGLENET_POOL_AFTER,
    RESNET50_STAGES,
    VGG16_BLOCKS,
    _pool_size,
)

layers = tf.keras.layers


def _conv_init() -> tf.keras.initializers.Initializer:
    return tf.keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


@tf.keras.utils.register_keras_serializable(package="larscale")
class LocalResponseNormalization(layers.Layer):
    """Caffe's across-channel LRN: x / (k + α/n · Σ_{n channels around} x²)^β, on the last (channel) axis."""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.nn.local_response_normalization(inputs, depth_radius=(self.size - 1) // 2, bias=self.k,
                                                  alpha=self.alpha / self.size, beta=self.beta)

    def get_config(self) -> dict:
        return {**super().get_config(), "size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k}


def conv(x: tf.Tensor, name: str, filters: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1,
         bias: bool = True) -> tf.Tensor:
    """A convolution with PyTorch's symmetric ``padding``."""
    mode = "valid"
    if padding and stride == 1 and 2 * padding == kernel - 1:
        mode = "same"  # symmetric for odd kernels at stride 1
    elif padding:
        x = layers.ZeroPadding2D(padding, name=f"{name}.pad")(x)
    return layers.Conv2D(filters, kernel, strides=stride, padding=mode, groups=groups, use_bias=bias,
                         kernel_initializer=_conv_init(), bias_initializer="zeros", name=name)(x)


def max_pool(x: tf.Tensor, name: str, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False) -> tf.Tensor:
    """Max pooling with PyTorch's output size; inputs must be ≥ 0 when padding is needed (see module doc)."""
    height, width = int(x.shape[1]), int(x.shape[2])
    pads = []
    for size in (height, width):
        out = _pool_size(size, kernel, stride, padding, ceil_mode)
        # Right padding that the last window reaches (a floor-mode pool may leave trailing pixels unused).
        pads.append((padding, max(0, (out - 1) * stride + kernel - size - padding)))
    if any(any(p) for p in pads):
        x = layers.ZeroPadding2D(tuple(pads), name=f"{name}.pad")(x)
    return layers.MaxPooling2D(kernel, strides=stride, padding="valid", name=name)(x)


def batch_norm(x: tf.Tensor, name: str, affine: bool = True, zero_gamma: bool = False) -> tf.Tensor:
    return layers.BatchNormalization(axis=-1, momentum=0.9, epsilon=1e-5, center=affine, scale=affine,
                                     gamma_initializer="zeros" if zero_gamma else "ones", name=name)(x)


def dense(x: tf.Tensor, name: str, units: int) -> tf.Tensor:
    return layers.Dense(units, kernel_initializer=tf.keras.initializers.RandomNormal(stddev=0.01),
                        bias_initializer="zeros", name=name)(x)


def relu(x: tf.Tensor, name: str) -> tf.Tensor:
    return layers.ReLU(name=name)(x)


def _head(x: tf.Tensor, num_classes: int, hidden: int = 4096) -> tf.Tensor:
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.5, name="drop6")(relu(dense(x, "fc6", hidden), "relu6"))
    x = layers.Dropout(0.5, name="drop7")(relu(dense(x, "fc7", hidden), "relu7"))
    return dense(x, "fc8", num_classes)


def alexnet(num_classes: int, image_size: int, batch_norm_: bool = False) -> tf.keras.Model:
    """AlexNet, Caffe layout of the LARS paper; ``batch_norm_`` gives AlexNet-BN (BN without scale/bias)."""

    def norm(x: tf.Tensor, name: str) -> tf.Tensor:
        return batch_norm(x, name, affine=False) if batch_norm_ else LocalResponseNormalization(name=name)(x)

    inputs = tf.keras.Input((image_size, image_size, 3), name="images")
    x = norm(relu(conv(inputs, "conv1", 96, 11, stride=4), "relu1"), "norm1")
    x = max_pool(x, "pool1", 3, 2)
    x = norm(relu(conv(x, "conv2", 256, 5, padding=2, groups=2), "relu2"), "norm2")
    x = max_pool(x, "pool2", 3, 2)
    x = relu(conv(x, "conv3", 384, 3, padding=1), "relu3")
    if batch_norm_:
        x = norm(x, "norm3")
    x = relu(conv(x, "conv4", 384, 3, padding=1, groups=2), "relu4")
    if batch_norm_:
        x = norm(x, "norm4")
    x = relu(conv(x, "conv5", 256, 3, padding=1, groups=2), "relu5")
    x = max_pool(x, "pool5", 3, 2)
    return tf.keras.Model(inputs, _head(x, num_classes), name="alexnet_bn" if batch_norm_ else "alexnet")


def vgg16(num_classes: int, image_size: int) -> tf.keras.Model:
    inputs = tf.keras.Input((image_size, image_size, 3), name="images")
    x = inputs
    for block, widths in enumerate(VGG16_BLOCKS, start=1):
        for index, width in enumerate(widths, start=1):
            x = relu(conv(x, f"conv{block}_{index}", width, 3, padding=1), f"relu{block}_{index}")
        x = max_pool(x, f"pool{block}", 2, 2)
    return tf.keras.Model(inputs, _head(x, num_classes), name="vgg16")


def resnet50(num_classes: int, image_size: int, stride_in_3x3: bool = True,
             zero_init_residual: bool = False) -> tf.keras.Model:
    """ResNet-50 v1.5 (``stride_in_3x3``) or v1; global average pooling, so any input size."""
    inputs = tf.keras.Input((image_size, image_size, 3), name="images")
    x = relu(batch_norm(conv(inputs, "conv1", 64, 7, stride=2, padding=3, bias=False), "bn1"), "relu")
    x = max_pool(x, "maxpool", 3, 2, padding=1)
    for stage, (width, blocks) in enumerate(RESNET50_STAGES, start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            p = f"layer{stage}.{block}"
            out = conv(x, f"{p}.conv1", width, 1, stride=1 if stride_in_3x3 else stride, bias=False)
            out = relu(batch_norm(out, f"{p}.bn1"), f"{p}.relu1")
            out = conv(out, f"{p}.conv2", width, 3, stride=stride if stride_in_3x3 else 1, padding=1, bias=False)
            out = relu(batch_norm(out, f"{p}.bn2"), f"{p}.relu2")
            out = batch_norm(conv(out, f"{p}.conv3", 4 * width, 1, bias=False), f"{p}.bn3",
                             zero_gamma=zero_init_residual)
            shortcut = x
            if stride != 1 or int(x.shape[-1]) != 4 * width:
                shortcut = conv(x, f"{p}.shortcut.conv", 4 * width, 1, stride=stride, bias=False)
                shortcut = batch_norm(shortcut, f"{p}.shortcut.bn")
            x = relu(layers.Add(name=f"{p}.add")([out, shortcut]), f"{p}.relu3")
    x = layers.GlobalAveragePooling2D(keepdims=True, name="avgpool")(x)
    x = dense(layers.Flatten(name="flatten")(x), "fc", num_classes)
    return tf.keras.Model(inputs, x, name="resnet50" if stride_in_3x3 else "resnet50_v1")


def googlenet(num_classes: int, image_size: int) -> tf.keras.Model:
    """GoogLeNet / Inception v1 in the BVLC layout (LRN, ceil-mode pooling, 5×5 branch), no auxiliary heads."""
    inputs = tf.keras.Input((image_size, image_size, 3), name="images")
    x = relu(conv(inputs, "conv1", 64, 7, stride=2, padding=3), "relu1")
    x = LocalResponseNormalization(name="norm1")(max_pool(x, "pool1", 3, 2, ceil_mode=True))
    x = relu(conv(x, "conv2_reduce", 64, 1), "relu2_reduce")
    x = relu(conv(x, "conv2", 192, 3, padding=1), "relu2")
    x = max_pool(LocalResponseNormalization(name="norm2")(x), "pool2", 3, 2, ceil_mode=True)
    for name, n1, n3_reduce, n3, n5_reduce, n5, pool_proj in GOOGLENET_INCEPTIONS:
        b1 = relu(conv(x, f"{name}.b1", n1, 1), f"{name}.b1_relu")
        b2 = relu(conv(x, f"{name}.b2_reduce", n3_reduce, 1), f"{name}.b2_reduce_relu")
        b2 = relu(conv(b2, f"{name}.b2", n3, 3, padding=1), f"{name}.b2_relu")
        b3 = relu(conv(x, f"{name}.b3_reduce", n5_reduce, 1), f"{name}.b3_reduce_relu")
        b3 = relu(conv(b3, f"{name}.b3", n5, 5, padding=2), f"{name}.b3_relu")
        b4 = max_pool(x, f"{name}.b4_pool", 3, 1, padding=1)
        b4 = relu(conv(b4, f"{name}.b4", pool_proj, 1), f"{name}.b4_relu")
        x = layers.Concatenate(axis=-1, name=f"{name}.concat")([b1, b2, b3, b4])
        if name in GOOGLENET_POOL_AFTER:
            x = max_pool(x, GOOGLENET_POOL_AFTER[name], 3, 2, ceil_mode=True)
    x = layers.GlobalAveragePooling2D(keepdims=True, name="avgpool")(x)
    x = layers.Dropout(0.4, name="dropout")(x)
    x = dense(layers.Flatten(name="flatten")(x), "fc", num_classes)
    return tf.keras.Model(inputs, x, name="googlenet")


def build(name: str, num_classes: int, image_size: int, **options: object) -> tf.keras.Model:
    """The Keras network ``name`` (already validated by ``models.get``) for NHWC input of ``image_size``."""
    builders = {
        "alexnet": lambda: alexnet(num_classes, image_size, batch_norm_=False, **options),
        "alexnet_bn": lambda: alexnet(num_classes, image_size, batch_norm_=True, **options),
        "resnet50": lambda: resnet50(num_classes, image_size, stride_in_3x3=True, **options),
        "resnet50_v1": lambda: resnet50(num_classes, image_size, stride_in_3x3=False, **options),
        "googlenet": lambda: googlenet(num_classes, image_size, **options),
        "vgg16": lambda: vgg16(num_classes, image_size, **options),
    }
    return builders[name]()
