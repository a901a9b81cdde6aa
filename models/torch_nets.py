"""PyTorch definitions of the six networks (NCHW). Module names equal the layer names of ``models.arch``.

Use :func:`models.get` rather than these classes directly: it validates the name, class count and image size.
Initialisation: convolutions He-normal over fan-out (the ReLU gain), fully-connected layers N(0, 0.01), biases
zero, BatchNorm γ = 1, β = 0 (γ of the last BN of each residual branch optionally 0, as in Goyal et al. 2017).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from models.arch import GOOGLENET_INCEPTIONS, GOOGLENET_POOL_AFTER, RESNET50_STAGES, VGG16_BLOCKS


def caffe_lrn() -> nn.LocalResponseNorm:
    """Caffe's LRN (local_size 5, α 1e-4, β 0.75, k 1): x / (k + α/n · Σ_window x²)^β; PyTorch also divides α by n."""
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=1.0)


def init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _head(in_features: int, num_classes: int, hidden: int = 4096) -> list[tuple[str, nn.Module]]:
    return [("fc6", nn.Linear(in_features, hidden)), ("relu6", nn.ReLU(inplace=True)), ("drop6", nn.Dropout(0.5)),
            ("fc7", nn.Linear(hidden, hidden)), ("relu7", nn.ReLU(inplace=True)), ("drop7", nn.Dropout(0.5)),
            ("fc8", nn.Linear(hidden, num_classes))]


class _FlatNet(nn.Module):
    """Layers run in order, with a flatten in front of the first fully-connected layer ``first_fc``.

    The flattened size fixes the input to ``3 × input_size × input_size``; another size is refused up front
    (rather than by a matrix-shape mismatch deep in the classifier).
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], first_fc: str, input_size: int) -> None:
        super().__init__()
        for name, layer in layers:
            self.add_module(name, layer)
        self.first_fc = first_fc
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (3, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} has a fixed-size classifier head: it takes input of shape "
                             f"(N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        for name, layer in self.named_children():
            if name == self.first_fc:
                x = torch.flatten(x, 1)
            x = layer(x)
        return x


class AlexNet(_FlatNet):
    """AlexNet in the Caffe layout of the LARS paper (227×227 input); ``batch_norm`` gives AlexNet-BN."""

    def __init__(self, num_classes: int = 1000, batch_norm: bool = False) -> None:
        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels, affine=False) if batch_norm else caffe_lrn()

        layers: list[tuple[str, nn.Module]] = [
            ("conv1", nn.Conv2d(3, 96, 11, stride=4)), ("relu1", nn.ReLU(inplace=True)), ("norm1", norm(96)),
            ("pool1", nn.MaxPool2d(3, 2)),
            ("conv2", nn.Conv2d(96, 256, 5, padding=2, groups=2)), ("relu2", nn.ReLU(inplace=True)),
            ("norm2", norm(256)), ("pool2", nn.MaxPool2d(3, 2)),
            ("conv3", nn.Conv2d(256, 384, 3, padding=1)), ("relu3", nn.ReLU(inplace=True)),
            *([("norm3", norm(384))] if batch_norm else []),
            ("conv4", nn.Conv2d(384, 384, 3, padding=1, groups=2)), ("relu4", nn.ReLU(inplace=True)),
            *([("norm4", norm(384))] if batch_norm else []),
            ("conv5", nn.Conv2d(384, 256, 3, padding=1, groups=2)), ("relu5", nn.ReLU(inplace=True)),
            ("pool5", nn.MaxPool2d(3, 2)),
            *_head(256 * 6 * 6, num_classes),
        ]
        super().__init__(layers, first_fc="fc6", input_size=227)
        init_weights(self)


class VGG16(_FlatNet):
    """VGG-16 (configuration D) for 224×224 inputs."""

    def __init__(self, num_classes: int = 1000) -> None:
        layers: list[tuple[str, nn.Module]] = []
        channels = 3
        for block, widths in enumerate(VGG16_BLOCKS, start=1):
            for index, width in enumerate(widths, start=1):
                layers += [(f"conv{block}_{index}", nn.Conv2d(channels, width, 3, padding=1)),
                           (f"relu{block}_{index}", nn.ReLU(inplace=True))]
                channels = width
            layers.append((f"pool{block}", nn.MaxPool2d(2, 2)))
        super().__init__([*layers, *_head(512 * 7 * 7, num_classes)], first_fc="fc6", input_size=224)
        init_weights(self)


class Bottleneck(nn.Module):
    """1×1 → 3×3 → 1×1 residual block; the stride sits in the 3×3 (v1.5) or in the first 1×1 (v1)."""

    def __init__(self, in_channels: int, width: int, stride: int, stride_in_3x3: bool) -> None:
        super().__init__()
        out_channels = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=1 if stride_in_3x3 else stride, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride if stride_in_3x3 else 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                bn=nn.BatchNorm2d(out_channels)))
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet50(nn.Module):
    """ResNet-50, v1.5 by default (``stride_in_3x3=False`` gives v1); any input size (global pooling)."""

    def __init__(self, num_classes: int = 1000, stride_in_3x3: bool = True, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        channels = 64
        for stage, (width, blocks) in enumerate(RESNET50_STAGES, start=1):
            stride = 1 if stage == 1 else 2
            layer = nn.Sequential(*(Bottleneck(channels if i == 0 else 4 * width, width, stride if i == 0 else 1,
                                               stride_in_3x3) for i in range(blocks)))
            self.add_module(f"layer{stage}", layer)
            channels = 4 * width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)
        if zero_init_residual:  # each block starts as the identity: helps very large batches (Goyal et al.)
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Inception(nn.Module):
    """Four parallel branches (1×1; 1×1→3×3; 1×1→5×5; 3×3 max pool→1×1) concatenated along channels."""

    def __init__(self, in_channels: int, n1: int, n3_reduce: int, n3: int, n5_reduce: int, n5: int,
                 pool_proj: int) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(in_channels, n1, 1)
        self.b1_relu = nn.ReLU(inplace=True)
        self.b2_reduce = nn.Conv2d(in_channels, n3_reduce, 1)
        self.b2_reduce_relu = nn.ReLU(inplace=True)
        self.b2 = nn.Conv2d(n3_reduce, n3, 3, padding=1)
        self.b2_relu = nn.ReLU(inplace=True)
        self.b3_reduce = nn.Conv2d(in_channels, n5_reduce, 1)
        self.b3_reduce_relu = nn.ReLU(inplace=True)
        self.b3 = nn.Conv2d(n5_reduce, n5, 5, padding=2)
        self.b3_relu = nn.ReLU(inplace=True)
        self.b4_pool = nn.MaxPool2d(3, 1, padding=1, ceil_mode=True)
        self.b4 = nn.Conv2d(in_channels, pool_proj, 1)
        self.b4_relu = nn.ReLU(inplace=True)
        self.out_channels = n1 + n3 + n5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.b1_relu(self.b1(x))
        b2 = self.b2_relu(self.b2(self.b2_reduce_relu(self.b2_reduce(x))))
        b3 = self.b3_relu(self.b3(self.b3_reduce_relu(self.b3_reduce(x))))
        b4 = self.b4_relu(self.b4(self.b4_pool(x)))
        return torch.cat([b1, b2, b3, b4], dim=1)


class GoogLeNet(nn.Module):
    """GoogLeNet / Inception v1 in the BVLC layout, without the auxiliary heads; any input size ≥ 31."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)  # Caffe rounds pooled sizes up
        self.norm1 = caffe_lrn()
        self.conv2_reduce = nn.Conv2d(64, 64, 1)
        self.relu2_reduce = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(64, 192, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.norm2 = caffe_lrn()
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.blocks: list[str] = []
        channels = 192
        for name, *widths in GOOGLENET_INCEPTIONS:
            block = Inception(channels, *widths)
            self.add_module(name, block)
            self.blocks.append(name)
            channels = block.out_channels
            if name in GOOGLENET_POOL_AFTER:
                self.add_module(GOOGLENET_POOL_AFTER[name], nn.MaxPool2d(3, 2, ceil_mode=True))
                self.blocks.append(GOOGLENET_POOL_AFTER[name])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.norm1(x)
        x = self.relu2(self.conv2(self.relu2_reduce(self.conv2_reduce(x))))
        x = self.pool2(self.norm2(x))
        for name in self.blocks:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.dropout(self.avgpool(x)), 1))


def build(name: str, num_classes: int, **options: object) -> nn.Module:
    """The PyTorch network ``name`` (already validated by ``models.get``); options go to its constructor."""
    builders = {
        "alexnet": lambda: AlexNet(num_classes, batch_norm=False, **options),
        "alexnet_bn": lambda: AlexNet(num_classes, batch_norm=True, **options),
        "resnet50": lambda: ResNet50(num_classes, stride_in_3x3=True, **options),
        "resnet50_v1": lambda: ResNet50(num_classes, stride_in_3x3=False, **options),
        "googlenet": lambda: GoogLeNet(num_classes, **options),
        "vgg16": lambda: VGG16(num_classes, **options),
    }
    return builders[name]()
