"""Seconds of one training step on one device, layer by layer, from the hardware: the roofline compute model.

Each layer of the network (traced from ``models.arch``, the same source as the packaged tables, with each
layer's input shapes and convolution groups added) costs, forward and backward separately,

    t = max(FLOPs / (peak × efficiency of its kind),  bytes moved / memory rate)

per image times the per-device batch x, plus the bytes of its weights (read forward, read and gradient
written backward) once per step. Convolutions and fully-connected layers do the FLOPs (2·MACs forward,
4·MACs backward, 2·MACs for the first layer, whose input needs no gradient); every layer moves bytes:

- matrix layers read their input and write their output forward; backward, the data gradient reads the output
  gradient and writes the input gradient (not for the first layer), the weight gradient reads both;
- memory-bound layers make the passes over their output (and input) that their kernels make, counted in
  :data:`KIND_COSTS` (BatchNorm: statistics, normalise; backward two reductions and the gradient: 8 passes);
- convolutions and GEMMs move their bytes at the library rate (``memory_efficiency`` × bandwidth: cuDNN's
  kernels keep their tiles in flight), the framework's memory-bound kernels at the rate their bytes in flight
  allow (below);
- activations are stored at the precision's width (2 bytes for bf16/fp16, 4 for fp32/tf32); LRN runs in fp32
  (autocast's ``pow``) whatever the precision.

Per step, independent of the batch: the optimizer's memory passes over the parameters (:data:`OPTIMIZER_PASSES`),
and a fixed device time per kernel (launch latency, ramp-up, tail). The matrix rate of a convolution falls
with few channels per group (``c / (c + channels_half)``) and for grouped convolutions. The memory rate is the
datasheet bandwidth × ``memory_efficiency``, and no more than the bytes in flight sustain (Little's law:
``compute_units × bytes_in_flight_per_unit / latency``). The constants and their sources are in
``analysis/data/devices.yaml``; :mod:`analysis.compute` adds the host's launch time and the small-batch
starvation of CPU cores, and applies calibration's scale.

Each layer's time is the larger of two affine functions of x, so a network's forward (or backward) time is a
convex piecewise-linear function of x with at most one knot per layer: :class:`PiecewiseLinear` holds it and
evaluates a million batch sizes in a few milliseconds. :func:`step_seconds_plain` computes the same sum layer by
layer for one batch size (the reference the vectorised curve is tested against).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import cache

import numpy as np

FP32_BYTES = 4.0


@dataclass(frozen=True)
class KindCost:
    """What one layer kind's kernels do per image (elements of the layer's output ``out`` and input ``in``)."""

    forward_out_passes: float      # element passes over the output tensor, forward
    forward_in_passes: float       # ... over the input tensor(s), forward
    backward_out_passes: float
    backward_in_passes: float
    kernels: int                   # kernels a training step launches for the layer (forward + backward)
    host_ops: int                  # framework operations the host dispatches for it (forward + backward)
    fp32: bool = False             # computed in fp32 whatever the precision (autocast's fp32 list)


# Memory-bound layers. Passes: a kernel that reads a tensor once and writes one counts 1 + 1. Host operations:
# the module call and its autograd node (2); matrix layers add autocast's weight cast and the two backward
# products (5). Kernels: forward and backward kernels as PyTorch launches them.
KIND_COSTS: dict[str, KindCost] = {
    # statistics pass + normalise (read, write); backward: reduction (read dy, x) + gradient (read dy, x, write)
    "batchnorm": KindCost(3, 0, 5, 0, kernels=4, host_ops=2),
    "relu": KindCost(2, 0, 3, 0, kernels=2, host_ops=2),                 # in place; backward reads y and dy
    "add": KindCost(1, 1, 3, 0, kernels=2, host_ops=2),                  # backward: the sum at the fork
    "maxpool": KindCost(2, 1, 2, 2, kernels=3, host_ops=2),              # indices saved; backward zero + scatter
    "avgpool": KindCost(1, 1, 1, 1, kernels=2, host_ops=2),
    "dropout": KindCost(2.25, 0, 2.25, 0, kernels=2, host_ops=2),        # 1-byte mask
    "concat": KindCost(1, 1, 1, 0, kernels=2, host_ops=2),               # backward: one slice per input (+1 op each)
    # PyTorch's LocalResponseNorm is ~8 element-wise ops and an avg_pool3d over a padded 5-D view forward (each
    # a pass, the pool uncoalesced on channels-last tensors), twice that backward, in fp32 (pow): the passes
    # are effective ones, set by GoogLeNet's H200 sweep (its only LRN user there).
    "lrn": KindCost(40, 0, 80, 0, kernels=24, host_ops=20, fp32=True),
}
MATRIX_KINDS = ("conv", "linear")
MATRIX_COST = KindCost(1, 1, 2, 2, kernels=3, host_ops=5)   # passes for reference; matrix layers: see module doc
UNKNOWN_KIND = KindCost(2, 0, 3, 0, kernels=2, host_ops=2)  # a new layer kind: one element-wise op each way
# Optimizer and mixed precision per step, in fp32 passes over the parameters: SGD/LARS momentum reads weight,
# gradient and momentum and writes weight and momentum (5), LARS's norms read weight and gradient again (2),
# autocast casts each weight to 16 bits every forward (1.5), the gradient is zeroed or reallocated (1).
OPTIMIZER_PASSES = 10.0


@dataclass(frozen=True)
class LayerCost:
    """One layer's per-image work for the compute model (see the module docstring)."""

    name: str
    kind: str
    forward_flops: float
    backward_flops: float
    forward_elements: float         # activation elements read + written per image, forward
    backward_elements: float
    weight_bytes_forward: float     # per step
    weight_bytes_backward: float
    channels: float                 # matrix layers: smaller of input/output channels per group; else inf
    grouped: bool
    kernels: int
    host_ops: int
    fp32: bool
    params: int


def _kind_cost(kind: str) -> KindCost:
    return KIND_COSTS.get(kind, UNKNOWN_KIND)


def layer_cost(name: str, kind: str, inputs: list[tuple[int, ...]], output: tuple[int, ...], params: int,
               macs: int, groups: int, first: bool) -> LayerCost:
    """The cost of one layer from its shapes (per image; channels-first shapes, ``inputs`` one per operand)."""
    out = float(math.prod(output))
    inp = float(sum(math.prod(shape) for shape in inputs)) if inputs else out
    if kind in MATRIX_KINDS:
        in_channels = inputs[0][0] if inputs and kind == "conv" else math.inf
        out_channels = output[0] if kind == "conv" else math.inf
        channels = min(in_channels, out_channels) / groups
        data_gradient = 0.0 if first else 1.0
        # Weights: MACs = outputs × weights per output, so weights = MACs × output channels / outputs; the rest
        # of the parameters are biases, whose gradient is one more reduction over the output gradient.
        weights = macs * (output[0] if output else 1) / out if out else 0.0
        bias = 1.0 if params > weights + 0.5 else 0.0
        return LayerCost(
            name=name, kind=kind, forward_flops=2.0 * macs, backward_flops=2.0 * macs * (1.0 + data_gradient),
            forward_elements=inp + out, backward_elements=(1.0 + data_gradient) * (inp + out) + bias * out,
            weight_bytes_forward=FP32_BYTES * params, weight_bytes_backward=2.0 * FP32_BYTES * params,
            channels=float(channels), grouped=groups > 1,
            kernels=MATRIX_COST.kernels - (0 if data_gradient else 1) + int(bias), host_ops=MATRIX_COST.host_ops,
            fp32=False, params=params)
    cost = _kind_cost(kind)
    extra_ops = len(inputs) if kind == "concat" else 0      # the backward's narrow() of each input
    return LayerCost(
        name=name, kind=kind, forward_flops=0.0, backward_flops=0.0,
        forward_elements=cost.forward_out_passes * out + cost.forward_in_passes * inp,
        backward_elements=cost.backward_out_passes * out + cost.backward_in_passes * inp,
        weight_bytes_forward=FP32_BYTES * params, weight_bytes_backward=2.0 * FP32_BYTES * params,
        channels=math.inf, grouped=False, kernels=cost.kernels, host_ops=cost.host_ops + extra_ops, fp32=cost.fp32,
        params=params)


@cache
def traced_layers(model: str, image_size: int | None = None, num_classes: int = 1000) -> tuple[LayerCost, ...]:
    """Every layer of ``model`` in forward order, with input shapes and groups from the architecture's trace.

    ``models.arch`` traces each architecture through a ShapeTracer; a subclass here notes the input shape(s)
    and the ``groups`` of each layer call before the row is recorded (the packaged tables keep outputs only).
    """
    from models.arch import ShapeTracer, architecture, check_num_classes, resolve_image_size

    size = resolve_image_size(model, image_size)
    notes: list[tuple[list[tuple[int, ...]], int]] = []

    def noting(method):
        signature = inspect.signature(method)

        def wrapper(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            shapes = [v for k, v in bound.arguments.items() if k not in ("self", "name") and _is_shape(v)]
            shapes += [s for v in bound.arguments.values() if isinstance(v, tuple) and v and _is_shape(v[0])
                       for s in v]
            before = len(self.rows)
            result = method(self, *args, **kwargs)
            if len(self.rows) == before + 1:
                notes.append((shapes, int(bound.arguments.get("groups", 1))))
            return result
        return wrapper

    methods = {name: noting(getattr(ShapeTracer, name)) for name, value in vars(ShapeTracer).items()
               if callable(value) and not name.startswith("_")}
    tracer = type("NotingTracer", (ShapeTracer,), methods)(model, size)
    architecture(model).trace(tracer, check_num_classes(num_classes))
    if len(notes) != len(tracer.rows):      # a layer recorded by a method this wrapper does not see
        return layers_from_rows(list(reversed(tracer.rows)), size)
    return tuple(layer_cost(row.name, row.kind, shapes or [row.output_shape], row.output_shape, row.params,
                            row.macs, groups, index == 0)
                 for index, (row, (shapes, groups)) in enumerate(zip(tracer.rows, notes, strict=True)))


def _is_shape(value) -> bool:
    return isinstance(value, tuple) and bool(value) and all(isinstance(n, int) for n in value)


def layers_from_rows(forward_rows, image_size: int = 224) -> tuple[LayerCost, ...]:
    """Costs from table rows alone (forward order): each layer's input taken as the previous layer's output
    (the image, 3 channels, for the first), additions reading two, convolutions ungrouped. Used for workloads
    built from rows that no architecture traces."""
    out: list[LayerCost] = []
    previous: tuple[int, ...] = (3, image_size, image_size)
    for index, row in enumerate(forward_rows):
        shape = tuple(row.output_shape)
        if row.kind == "add":
            inputs = [shape, shape]
        elif row.kind in MATRIX_KINDS or row.kind in ("maxpool", "avgpool", "concat"):
            inputs = [previous]
        else:
            inputs = [shape]
        out.append(layer_cost(row.name, row.kind, inputs, shape, row.params, row.macs, 1, index == 0))
        previous = shape
    return tuple(out)


@dataclass(frozen=True)
class DeviceRates:
    """What one device sustains, for the compute model (SI units)."""

    matrix_flops_per_s: float       # peak of the precision × matrix efficiency (large channel counts)
    channels_half: float
    grouped_efficiency: float
    memory_bytes_per_s: float       # bandwidth the framework's memory-bound kernels reach (Little's law)
    activation_bytes: float         # bytes per stored activation value at this precision
    kernel_s: float                 # device seconds per kernel, fixed
    # Bandwidth of the vendor library's convolution and GEMM kernels (cuDNN, cuBLAS, oneDNN): they stage
    # tiles with asynchronous copies and keep enough bytes in flight, so only the efficiency applies.
    library_memory_bytes_per_s: float = 0.0
    # Compiled steps (torch.compile, CUDA graphs) fuse element-wise kernels into their neighbours: the share of
    # the memory-bound layers' passes (and of all kernels) left; 1 for eager execution.
    memory_pass_share: float = 1.0
    kernel_share: float = 1.0

    def __post_init__(self) -> None:
        if not self.library_memory_bytes_per_s:
            object.__setattr__(self, "library_memory_bytes_per_s", self.memory_bytes_per_s)


def memory_rate(bandwidth_bytes_per_s: float, efficiency: float, compute_units: float, bytes_in_flight: float,
                latency_s: float) -> float:
    """Bandwidth memory-bound kernels reach: ``efficiency × bandwidth``, limited by the bytes in flight.

    Little's law: a device with ``compute_units`` SMs (or cores) that each keep ``bytes_in_flight`` requested
    moves at most ``units × bytes / latency`` per second. The two limits combine harmonically (a kernel pays
    both the transfer and the wait for the latency it cannot hide).
    """
    streaming = bandwidth_bytes_per_s * efficiency
    concurrency = compute_units * bytes_in_flight / latency_s
    return 1.0 / (1.0 / streaming + 1.0 / concurrency)


def _matrix_rate(layer: LayerCost, rates: DeviceRates) -> float:
    shape = layer.channels / (layer.channels + rates.channels_half) if math.isfinite(layer.channels) else 1.0
    return rates.matrix_flops_per_s * shape * (rates.grouped_efficiency if layer.grouped else 1.0)


def _pieces(layer: LayerCost, rates: DeviceRates, backward: bool) -> tuple[float, float, float]:
    """``(a, c, w)`` of one pass of a layer: its time is ``max(a·x, c·x + w)`` at per-device batch x."""
    flops = layer.backward_flops if backward else layer.forward_flops
    elements = layer.backward_elements if backward else layer.forward_elements
    weights = layer.weight_bytes_backward if backward else layer.weight_bytes_forward
    width = FP32_BYTES if layer.fp32 else rates.activation_bytes
    a = flops / _matrix_rate(layer, rates) if flops > 0 else 0.0
    if layer.kind in MATRIX_KINDS:
        return a, elements * width / rates.library_memory_bytes_per_s, weights / rates.library_memory_bytes_per_s
    memory = rates.memory_bytes_per_s
    return a, elements * rates.memory_pass_share * width / memory, weights / memory


def fixed_step_seconds(layers: tuple[LayerCost, ...], rates: DeviceRates) -> float:
    """Per-step device time independent of the batch: the optimizer's passes and the per-kernel cost."""
    params = sum(layer.params for layer in layers)
    kernels = sum(layer.kernels for layer in layers)
    return (OPTIMIZER_PASSES * FP32_BYTES * params / rates.memory_bytes_per_s
            + kernels * rates.kernel_share * rates.kernel_s)


def host_ops(layers: tuple[LayerCost, ...]) -> int:
    return sum(layer.host_ops for layer in layers)


@dataclass(frozen=True)
class StepSeconds:
    forward_s: float
    backward_s: float
    fixed_s: float

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s + self.fixed_s


def step_seconds_plain(layers: tuple[LayerCost, ...], rates: DeviceRates, batch_per_device: float) -> StepSeconds:
    """The model for one batch size, layer by layer (the reference :class:`PiecewiseLinear` must equal)."""
    x = float(batch_per_device)
    forward = backward = 0.0
    for layer in layers:
        a, c, w = _pieces(layer, rates, backward=False)
        forward += max(a * x, c * x + w)
        a, c, w = _pieces(layer, rates, backward=True)
        backward += max(a * x, c * x + w)
    return StepSeconds(forward, backward, fixed_step_seconds(layers, rates))


@dataclass(frozen=True)
class PiecewiseLinear:
    """``f(x) = Σ_l max(a_l·x, c_l·x + w_l)`` for x > 0, as knots with a slope and intercept per segment."""

    knots: np.ndarray        # increasing; segment i is [knots[i-1], knots[i]) (segment 0 below the first)
    slopes: np.ndarray       # len(knots) + 1
    intercepts: np.ndarray

    @classmethod
    def from_pieces(cls, pieces: list[tuple[float, float, float]]) -> PiecewiseLinear:
        # Below its knot x* = w/(a − c) a layer follows the memory line c·x + w, above it the FLOP line a·x
        # (a layer whose FLOP line never wins stays on the memory line).
        knots, slope_change, intercept_change = [], [], []
        slope = intercept = 0.0
        for a, c, w in pieces:
            slope += c
            intercept += w
            if a > c:
                knots.append(w / (a - c))
                slope_change.append(a - c)
                intercept_change.append(-w)
        order = np.argsort(knots)
        knots_a = np.asarray(knots, dtype=float)[order]
        slopes = slope + np.concatenate([[0.0], np.cumsum(np.asarray(slope_change, dtype=float)[order])])
        intercepts = intercept + np.concatenate([[0.0], np.cumsum(np.asarray(intercept_change, dtype=float)[order])])
        return cls(knots_a, slopes, intercepts)

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        segment = np.searchsorted(self.knots, x, side="right")
        return self.slopes[segment] * x + self.intercepts[segment]


@dataclass(frozen=True)
class RooflineCurves:
    forward: PiecewiseLinear
    backward: PiecewiseLinear
    fixed_s: float
    host_ops: int


def roofline_curves(layers: tuple[LayerCost, ...], rates: DeviceRates) -> RooflineCurves:
    """Forward and backward seconds as functions of the per-device batch, and the per-step constants."""
    return RooflineCurves(
        forward=PiecewiseLinear.from_pieces([_pieces(layer, rates, backward=False) for layer in layers]),
        backward=PiecewiseLinear.from_pieces([_pieces(layer, rates, backward=True) for layer in layers]),
        fixed_s=fixed_step_seconds(layers, rates), host_ops=host_ops(layers))
