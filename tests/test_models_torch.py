"""PyTorch networks against the analytical tables: parameters counted by numel, MACs and shapes measured by hooks
on a real forward pass, gradient-ready order observed in a real backward pass, at the native input size."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import models
from models.tables import layer_table, load_table

NUM_CLASSES = 1000  # the packaged tables' class count


@dataclass
class Measured:
    """What one forward + backward pass of a batch of 2 showed."""

    output_shape: tuple[int, ...]
    macs: dict[str, int] = field(default_factory=dict)  # per image, from the real output shapes
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-image output shape of every leaf
    gradient_order: list[str] = field(default_factory=list)  # modules in the order their gradients were ready
    all_gradients_finite: bool = False


def measure(model: nn.Module, image_size: int, batch: int = 2) -> Measured:
    """Run forward and backward once with hooks on every leaf module and every parameter."""
    result = Measured(output_shape=())
    handles = []

    def forward_hook(name: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            result.shapes[name] = tuple(output.shape[1:])
            if isinstance(module, nn.Conv2d | nn.Linear):
                # Each output value is a dot product over one filter: weight[0] holds (C_in/groups)·k_h·k_w
                # values for a convolution and in_features for a linear layer.
                result.macs[name] = output[0].numel() * module.weight[0].numel()
        return hook

    def grad_hook(name: str):
        def hook(parameter: torch.Tensor) -> None:
            if name not in result.gradient_order:
                result.gradient_order.append(name)
        return hook

    for name, module in model.named_modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(forward_hook(name)))
            for parameter in module.parameters(recurse=False):
                handles.append(parameter.register_post_accumulate_grad_hook(grad_hook(name)))
    torch.manual_seed(0)
    model.train()
    output = model(torch.randn(batch, 3, image_size, image_size))
    output.logsumexp(dim=1).mean().backward()
    for handle in handles:
        handle.remove()
    result.output_shape = tuple(output.shape)
    result.all_gradients_finite = all(p.grad is not None and bool(torch.isfinite(p.grad).all())
                                      for p in model.parameters())
    return result


Native = tuple[str, nn.Module, Measured]


@pytest.fixture(scope="module", params=models.names())
def native(request) -> Native:
    """Each model at its native size and its one measured pass; module scope runs a model's tests together."""
    torch.set_num_threads(2)
    model = models.get(request.param, framework="torch", num_classes=NUM_CLASSES)
    return request.param, model, measure(model, models.input_size(request.param))


def test_forward_backward_batch_of_two_at_native_size(native: Native) -> None:
    _, _, run = native
    assert run.output_shape == (2, NUM_CLASSES)
    assert run.all_gradients_finite


def test_parameter_count_equals_table_per_layer(native: Native) -> None:
    name, model, _ = native
    table = load_table(name)
    assert sum(p.numel() for p in model.parameters()) == sum(r.params for r in table)
    modules = dict(model.named_modules())
    for row in table:
        if row.params:
            assert sum(p.numel() for p in modules[row.name].parameters()) == row.params, row.name
    # Every parameter belongs to a layer of the table.
    owners = {module_name for module_name, m in model.named_modules() if list(m.parameters(recurse=False))}
    assert owners == {r.name for r in table if r.params}


def test_hook_measured_macs_equal_table(native: Native) -> None:
    name, _, run = native
    table = load_table(name)
    analytical = {r.name: r.macs for r in table if r.kind in ("conv", "linear")}
    assert run.macs == analytical
    assert sum(run.macs.values()) == sum(r.macs for r in table)


def test_output_shapes_of_every_module_equal_table(native: Native) -> None:
    name, _, run = native
    table = {r.name: r.output_shape for r in load_table(name)}
    assert run.shapes and set(run.shapes) <= set(table)
    for module_name, shape in run.shapes.items():
        assert shape == table[module_name], module_name


def test_gradients_become_ready_in_table_order(native: Native) -> None:
    name, _, run = native
    assert run.gradient_order == [r.name for r in load_table(name) if r.params]


@pytest.mark.parametrize(("name", "image_size"), [("resnet50", 64), ("resnet50_v1", 48), ("googlenet", 75)])
def test_fully_convolutional_models_at_other_sizes(name: str, image_size: int) -> None:
    model = models.get(name, num_classes=10, image_size=image_size)
    run = measure(model, image_size)
    table = layer_table(name, image_size, num_classes=10)
    assert run.output_shape == (2, 10)
    assert run.macs == {r.name: r.macs for r in table if r.macs}
    assert all(run.shapes[r.name] == r.output_shape for r in table if r.name in run.shapes)


def test_resnet_variants_differ_only_in_stride_placement() -> None:
    v15 = models.get("resnet50", num_classes=10)
    v1 = models.get("resnet50_v1", num_classes=10)
    assert v15.layer2[0].conv2.stride == (2, 2) and v15.layer2[0].conv1.stride == (1, 1)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert [p.shape for p in v15.parameters()] == [p.shape for p in v1.parameters()]


def test_alexnet_layout_is_caffe() -> None:
    plain = models.get("alexnet")
    assert [plain.conv2.groups, plain.conv3.groups, plain.conv4.groups, plain.conv5.groups] == [2, 1, 2, 2]
    assert isinstance(plain.norm1, nn.LocalResponseNorm) and plain.norm1.size == 5
    bn = models.get("alexnet_bn")
    norms = [m for m in bn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.num_features for m in norms] == [96, 256, 384, 384] and not any(m.affine for m in norms)


def test_zero_init_residual_option() -> None:
    model = models.get("resnet50", num_classes=10, image_size=32, zero_init_residual=True)
    assert all(not block.bn3.weight.detach().any() for layer in (model.layer1, model.layer4) for block in layer)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "resnet18"}, "unknown model 'resnet18'; known models: alexnet, alexnet_bn, resnet50, resnet50_v1, "
                           "googlenet, vgg16"),
    ({"name": "alexnet", "image_size": 224}, "alexnet has a fixed-size classifier head: image_size must be 227"),
    ({"name": "vgg16", "image_size": 32}, "vgg16 has a fixed-size classifier head: image_size must be 224"),
    ({"name": "googlenet", "image_size": 16}, "image_size 16 is too small for googlenet"),
    ({"name": "resnet50", "image_size": -1}, "image_size must be a positive integer, got -1"),
    ({"name": "resnet50", "num_classes": 0}, "num_classes must be a positive integer, got 0"),
    ({"name": "vgg16", "num_classes": -10}, "num_classes must be a positive integer, got -10"),
    ({"name": "alexnet", "num_classes": True}, "num_classes must be a positive integer, got True"),
    ({"name": "alexnet", "framework": "jax"}, "unknown framework 'jax'; known frameworks: torch, tensorflow"),
])
def test_bad_arguments_raise_value_errors_naming_the_culprit(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        models.get(**kwargs)


def test_fixed_head_model_refuses_wrong_input_size_at_forward() -> None:
    model = models.get("alexnet", num_classes=10)
    with pytest.raises(ValueError, match=r"fixed-size classifier head: it takes input of shape \(N, 3, 227, 227\), "
                                         r"got \(1, 3, 224, 224\)"):
        model(torch.zeros(1, 3, 224, 224))
