"""The six networks described layer by layer, without torch or tensorflow: shapes, parameters and MACs.

Each architecture is a function that "traces" the network through a :class:`ShapeTracer`: every layer call
computes the layer's per-image output shape from its input shape and records one :class:`LayerRow`. The
framework definitions (``models.torch_nets``, ``models.keras_nets``) are written separately, with the same
layer names, and the tests check them against these rows (parameter counts, output shapes, and MACs
measured by hooks on a real forward pass).

What the columns count, for one image (the batch size multiplies everything but ``params``):

- ``params``: trainable parameters of the layer (weights and biases; BatchNorm γ and β when affine). BatchNorm
  running mean/variance are buffers, not parameters: they are not trained, not allreduced, and PyTorch does
  not count them (Keras' ``count_params`` does: the tests compare like with like).
- ``macs``: multiply-adds of the forward pass in convolutions and fully-connected layers only, the convention
  of the published figures. A convolution producing ``C_out × H_out × W_out`` outputs from ``C_in`` channels
  in ``groups`` groups with a ``k_h × k_w`` kernel does ``C_out·H_out·W_out · (C_in/groups)·k_h·k_w`` MACs; a
  fully-connected layer ``n_in → n_out`` does ``n_in·n_out``. Bias additions, BatchNorm, LRN, pooling, ReLU
  and additions are not counted (they are < 1 % of the total for these networks). FLOPs = 2 × MACs; a
  training step is ≈ 3 × the forward MACs (forward, gradient w.r.t. inputs, gradient w.r.t. weights).
- ``activation_bytes``: fp32 bytes of the layer's output tensor (4 × its elements).
- ``gradient_bytes``: fp32 bytes of the layer's parameter gradients (4 × ``params``): what the allreduce moves.

Output shapes are channels-first ``(C, H, W)`` for feature maps and ``(features,)`` after the classifier's
flatten. Tables list the layers in the order their gradients become ready in the backward pass, i.e. the
reverse of the forward (topological) order: the last layer first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

BYTES_PER_VALUE = 4  # fp32

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayerRow:
    """One layer of a network, for one image (see the module docstring for what each column counts)."""

    name: str
    kind: str
    output_shape: Shape
    params: int
    macs: int
    activation_bytes: int
    gradient_bytes: int


class ShapeTracer:
    """Propagates per-image shapes through layer calls, recording one row per layer in forward order.

    Every method takes the input shape and returns the output shape, so an architecture reads like its
    forward pass. A layer whose output would have a spatial size below 1 raises ValueError: the image is too
    small for the network.
    """

    def __init__(self, network: str, image_size: int) -> None:
        self.network = network
        self.image_size = image_size
        self.rows: list[LayerRow] = []

    def _record(self, name: str, kind: str, shape: Shape, params: int = 0, macs: int = 0) -> Shape:
        if any(n < 1 for n in shape):
            raise ValueError(f"image_size {self.image_size} is too small for {self.network}: layer {name!r} "
                             f"would output shape {shape}")
        if any(row.name == name for row in self.rows):
            raise ValueError(f"duplicate layer name {name!r} in {self.network}")  # a bug in an architecture
        self.rows.append(LayerRow(name=name, kind=kind, output_shape=shape, params=params, macs=macs,
                                  activation_bytes=BYTES_PER_VALUE * math.prod(shape),
                                  gradient_bytes=BYTES_PER_VALUE * params))
        return shape

    def conv(self, name: str, x: Shape, out_channels: int, kernel: int, stride: int = 1, padding: int = 0,
             groups: int = 1, bias: bool = True) -> Shape:
        """Convolution: H_out = ⌊(H + 2p − k)/s⌋ + 1; params = C_out·(C_in/g)·k² (+ C_out biases)."""
        in_channels, height, width = x
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"layer {name!r}: channels {in_channels}->{out_channels} not divisible by {groups}")
        out_h = (height + 2 * padding - kernel) // stride + 1
        out_w = (width + 2 * padding - kernel) // stride + 1
        weights_per_output = (in_channels // groups) * kernel * kernel
        params = out_channels * weights_per_output + (out_channels if bias else 0)
        macs = out_channels * out_h * out_w * weights_per_output
        return self._record(name, "conv", (out_channels, out_h, out_w), params, macs)

    def linear(self, name: str, x: Shape, out_features: int, bias: bool = True) -> Shape:
        """Fully-connected layer on the flattened input: params = n_in·n_out (+ n_out biases)."""
        in_features = math.prod(x)
        params = in_features * out_features + (out_features if bias else 0)
        return self._record(name, "linear", (out_features,), params, in_features * out_features)

    def batch_norm(self, name: str, x: Shape, affine: bool = True) -> Shape:
        """BatchNorm over channels: 2·C trainable parameters (γ, β) when affine, none otherwise."""
        return self._record(name, "batchnorm", x, 2 * x[0] if affine else 0)

    def relu(self, name: str, x: Shape) -> Shape:
        return self._record(name, "relu", x)

    def lrn(self, name: str, x: Shape) -> Shape:
        """Local response normalisation across channels (no parameters)."""
        return self._record(name, "lrn", x)

    def dropout(self, name: str, x: Shape) -> Shape:
        return self._record(name, "dropout", x)

    def max_pool(self, name: str, x: Shape, kernel: int, stride: int, padding: int = 0,
                 ceil_mode: bool = False) -> Shape:
        """Max pooling with PyTorch's (and Caffe's, with ``ceil_mode``) output-size rule.

        H_out = ⌊(H + 2p − k)/s⌋ + 1, or with ceil_mode ⌈(H + 2p − k)/s⌉ + 1, less one when the last window
        would start in the right padding.
        """
        channels, height, width = x
        return self._record(name, "maxpool", (channels, _pool_size(height, kernel, stride, padding, ceil_mode),
                                              _pool_size(width, kernel, stride, padding, ceil_mode)))

    def global_avg_pool(self, name: str, x: Shape) -> Shape:
        return self._record(name, "avgpool", (x[0], 1, 1))

    def add(self, name: str, a: Shape, b: Shape) -> Shape:
        if a != b:
            raise ValueError(f"layer {name!r}: cannot add shapes {a} and {b}")
        return self._record(name, "add", a)

    def concat(self, name: str, *xs: Shape) -> Shape:
        """Concatenation along channels."""
        if len({x[1:] for x in xs}) != 1:
            raise ValueError(f"layer {name!r}: cannot concatenate shapes {xs}")
        return self._record(name, "concat", (sum(x[0] for x in xs), *xs[0][1:]))


def _pool_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    # Floor division rounds towards −∞ like PyTorch, so a window larger than the padded input gives 0 (or
    # 1 in ceil mode when the input is at least half the window: the window may hang over the right edge).
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


# ---------------------------------------------------------------------------------------------------------
# The architectures. Layer names are the PyTorch module names (dotted paths) and the Keras layer names.


def _alexnet(t: ShapeTracer, num_classes: int, batch_norm: bool) -> None:
    """AlexNet in the Caffe layout of the LARS paper: 227×227 input, grouped conv2/conv4/conv5.

    With ``batch_norm`` (AlexNet-BN) BatchNorm without scale/bias replaces LRN and also follows conv3 and
    conv4, so that a BN sits in front of each of conv2..conv5.
    """
    x = t.conv("conv1", (3, t.image_size, t.image_size), 96, 11, stride=4)
    x = t.relu("relu1", x)
    x = t.batch_norm("norm1", x, affine=False) if batch_norm else t.lrn("norm1", x)
    x = t.max_pool("pool1", x, 3, 2)
    x = t.conv("conv2", x, 256, 5, padding=2, groups=2)
    x = t.relu("relu2", x)
    x = t.batch_norm("norm2", x, affine=False) if batch_norm else t.lrn("norm2", x)
    x = t.max_pool("pool2", x, 3, 2)
    x = t.conv("conv3", x, 384, 3, padding=1)
    x = t.relu("relu3", x)
    if batch_norm:
        x = t.batch_norm("norm3", x, affine=False)
    x = t.conv("conv4", x, 384, 3, padding=1, groups=2)
    x = t.relu("relu4", x)
    if batch_norm:
        x = t.batch_norm("norm4", x, affine=False)
    x = t.conv("conv5", x, 256, 3, padding=1, groups=2)
    x = t.relu("relu5", x)
    x = t.max_pool("pool5", x, 3, 2)
    _classifier(t, x, num_classes, hidden=4096)


def _classifier(t: ShapeTracer, x: Shape, num_classes: int, hidden: int) -> None:
    """The AlexNet/VGG head: fc6, fc7 (ReLU, dropout 0.5) and fc8."""
    x = t.linear("fc6", x, hidden)
    x = t.relu("relu6", x)
    x = t.dropout("drop6", x)
    x = t.linear("fc7", x, hidden)
    x = t.relu("relu7", x)
    x = t.dropout("drop7", x)
    t.linear("fc8", x, num_classes)


VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def _vgg16(t: ShapeTracer, num_classes: int) -> None:
    """VGG-16 (configuration D): 13 3×3 convolutions in five blocks, each closed by a 2×2 max pool."""
    x: Shape = (3, t.image_size, t.image_size)
    for block, widths in enumerate(VGG16_BLOCKS, start=1):
        for index, width in enumerate(widths, start=1):
            x = t.conv(f"conv{block}_{index}", x, width, 3, padding=1)
            x = t.relu(f"relu{block}_{index}", x)
        x = t.max_pool(f"pool{block}", x, 2, 2)
    _classifier(t, x, num_classes, hidden=4096)


RESNET50_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (bottleneck width, blocks); output = 4 × width


def _resnet50(t: ShapeTracer, num_classes: int, stride_in_3x3: bool) -> None:
    """ResNet-50: v1.5 strides in the bottleneck's 3×3 convolution, v1 in its first 1×1."""
    x = t.conv("conv1", (3, t.image_size, t.image_size), 64, 7, stride=2, padding=3, bias=False)
    x = t.batch_norm("bn1", x)
    x = t.relu("relu", x)
    x = t.max_pool("maxpool", x, 3, 2, padding=1)
    for stage, (width, blocks) in enumerate(RESNET50_STAGES, start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            p = f"layer{stage}.{block}"
            out = t.conv(f"{p}.conv1", x, width, 1, stride=1 if stride_in_3x3 else stride, bias=False)
            out = t.batch_norm(f"{p}.bn1", out)
            out = t.relu(f"{p}.relu1", out)
            out = t.conv(f"{p}.conv2", out, width, 3, stride=stride if stride_in_3x3 else 1, padding=1,
                         bias=False)
            out = t.batch_norm(f"{p}.bn2", out)
            out = t.relu(f"{p}.relu2", out)
            out = t.conv(f"{p}.conv3", out, 4 * width, 1, bias=False)
            out = t.batch_norm(f"{p}.bn3", out)
            shortcut = x
            if stride != 1 or x[0] != 4 * width:
                shortcut = t.conv(f"{p}.shortcut.conv", x, 4 * width, 1, stride=stride, bias=False)
                shortcut = t.batch_norm(f"{p}.shortcut.bn", shortcut)
            out = t.add(f"{p}.add", out, shortcut)
            x = t.relu(f"{p}.relu3", out)
    x = t.global_avg_pool("avgpool", x)
    t.linear("fc", x, num_classes)


# Inception modules of GoogLeNet: (name, #1×1, #3×3 reduce, #3×3, #5×5 reduce, #5×5, pool proj).
GOOGLENET_INCEPTIONS = (
    ("inception_3a", 64, 96, 128, 16, 32, 32),
    ("inception_3b", 128, 128, 192, 32, 96, 64),
    ("inception_4a", 192, 96, 208, 16, 48, 64),
    ("inception_4b", 160, 112, 224, 24, 64, 64),
    ("inception_4c", 128, 128, 256, 24, 64, 64),
    ("inception_4d", 112, 144, 288, 32, 64, 64),
    ("inception_4e", 256, 160, 320, 32, 128, 128),
    ("inception_5a", 256, 160, 320, 32, 128, 128),
    ("inception_5b", 384, 192, 384, 48, 128, 128),
)
GOOGLENET_POOL_AFTER = {"inception_3b": "pool3", "inception_4e": "pool4"}


def _googlenet(t: ShapeTracer, num_classes: int) -> None:
    """GoogLeNet / Inception v1 in the BVLC layout (LRN, ceil-mode pooling, true 5×5), no auxiliary heads."""
    x = t.conv("conv1", (3, t.image_size, t.image_size), 64, 7, stride=2, padding=3)
    x = t.relu("relu1", x)
    x = t.max_pool("pool1", x, 3, 2, ceil_mode=True)
    x = t.lrn("norm1", x)
    x = t.conv("conv2_reduce", x, 64, 1)
    x = t.relu("relu2_reduce", x)
    x = t.conv("conv2", x, 192, 3, padding=1)
    x = t.relu("relu2", x)
    x = t.lrn("norm2", x)
    x = t.max_pool("pool2", x, 3, 2, ceil_mode=True)
    for name, n1, n3_reduce, n3, n5_reduce, n5, pool_proj in GOOGLENET_INCEPTIONS:
        b1 = t.relu(f"{name}.b1_relu", t.conv(f"{name}.b1", x, n1, 1))
        b2 = t.relu(f"{name}.b2_reduce_relu", t.conv(f"{name}.b2_reduce", x, n3_reduce, 1))
        b2 = t.relu(f"{name}.b2_relu", t.conv(f"{name}.b2", b2, n3, 3, padding=1))
        b3 = t.relu(f"{name}.b3_reduce_relu", t.conv(f"{name}.b3_reduce", x, n5_reduce, 1))
        b3 = t.relu(f"{name}.b3_relu", t.conv(f"{name}.b3", b3, n5, 5, padding=2))
        b4 = t.max_pool(f"{name}.b4_pool", x, 3, 1, padding=1)
        b4 = t.relu(f"{name}.b4_relu", t.conv(f"{name}.b4", b4, pool_proj, 1))
        x = t.concat(f"{name}.concat", b1, b2, b3, b4)
        if name in GOOGLENET_POOL_AFTER:
            x = t.max_pool(GOOGLENET_POOL_AFTER[name], x, 3, 2, ceil_mode=True)
    x = t.global_avg_pool("avgpool", x)
    x = t.dropout("dropout", x)
    t.linear("fc", x, num_classes)


@dataclass(frozen=True)
class Architecture:
    """A network of the registry: its native input size, whether its head fixes that size, its layers."""

    name: str
    description: str
    input_size: int
    fixed_head: bool  # a flatten + fully-connected head: only the native input size fits
    trace: Callable[[ShapeTracer, int], None]


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("alexnet", "AlexNet, Caffe layout of the LARS paper (LRN, grouped conv2/4/5)", 227, True,
                 lambda t, n: _alexnet(t, n, batch_norm=False)),
    Architecture("alexnet_bn", "AlexNet-BN: BatchNorm without scale/bias before conv2..5 instead of LRN", 227,
                 True, lambda t, n: _alexnet(t, n, batch_norm=True)),
    Architecture("resnet50", "ResNet-50 v1.5 (stride in the bottleneck's 3x3 convolution)", 224, False,
                 lambda t, n: _resnet50(t, n, stride_in_3x3=True)),
    Architecture("resnet50_v1", "ResNet-50 v1 (stride in the bottleneck's first 1x1 convolution)", 224, False,
                 lambda t, n: _resnet50(t, n, stride_in_3x3=False)),
    Architecture("googlenet", "GoogLeNet / Inception v1, BVLC layout, no auxiliary heads", 224, False,
                 _googlenet),
    Architecture("vgg16", "VGG-16 (configuration D)", 224, True, _vgg16),
)}


class UnknownModelError(ValueError):
    """A model name that is not in the registry."""


def architecture(name: str) -> Architecture:
    """The registry entry for ``name``; an unknown name raises an error listing the known ones."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(ARCHITECTURES)}") from None


def check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return num_classes


def resolve_image_size(name: str, image_size: int | None) -> int:
    """The input size a model is built for: its native size when ``image_size`` is None.

    Fixed-head models (flatten + fully-connected classifier) accept only their native size; the fully
    convolutional ones (global average pooling) accept any size at which every layer keeps at least one
    pixel (31 and up for GoogLeNet).
    """
    arch = architecture(name)
    if image_size is None:
        return arch.input_size
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if arch.fixed_head and image_size != arch.input_size:
        raise ValueError(f"{name} has a fixed-size classifier head: image_size must be {arch.input_size}, "
                         f"got {image_size}")
    return image_size


def layer_table(name: str, image_size: int | None = None, num_classes: int = 1000) -> list[LayerRow]:
    """The per-layer table of ``name`` at ``image_size`` (native when None), last layer first.

    Pure python: computed from the layer shapes, so it can be evaluated for any valid size without torch.
    """
    size = resolve_image_size(name, image_size)
    tracer = ShapeTracer(name, size)
    architecture(name).trace(tracer, check_num_classes(num_classes))
    return tracer.rows[::-1]
