"""LARS (layer-wise adaptive rate scaling) for PyTorch, written to be read: the reference the fast paths match.

The trainer uses :class:`scaling.optim_fast.FastLARS`, the same update computed with few passes over memory and no
host synchronisation; tests/test_lars_fast.py holds it to this class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, required

__all__ = ["LARS", "uses_trust_ratio", "check_group"]

MOMENTUM_BUFFER = "momentum_buffer"


def scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of per-tensor scalars (norms, ratios): float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def uses_trust_ratio(group: dict[str, Any], param: Tensor) -> bool:
    """Whether ``param`` of ``group`` gets the trust ratio and weight decay (else: plain momentum SGD)."""
    if group["lars"] is not None:
        return bool(group["lars"])
    return not (group["exclude_1d"] and param.ndim <= 1)


def _check_number(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
                  high_open: bool = False, tensor_ok: bool = False) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a number in the interval (or an allowed tensor)."""
    if tensor_ok and isinstance(value, Tensor):
        return  # a tensor LR is not inspected: reading it would be a host synchronisation
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"LARS {name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or math.isnan(value):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"LARS {name} must be in {interval}, got {value!r}")


def check_group(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first out-of-range hyper-parameter of a parameter group."""
    _check_number("lr", group["lr"], 0.0, tensor_ok=True)
    _check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
    _check_number("weight_decay", group["weight_decay"], 0.0)
    _check_number("trust_coefficient", group["trust_coefficient"], 0.0, low_open=True)
    if group["lars"] not in (None, True, False):
        raise ValueError(f"LARS group key 'lars' must be True, False or None, got {group['lars']!r}")


class LARS(Optimizer):
    """Momentum SGD with the LARS per-tensor trust ratio (You, Gitman, Ginsburg 2017, arXiv:1708.03888).

    For every weight tensor w with gradient g, global learning rate γ_t, trust coefficient η, weight decay β and
    momentum m::

        local_lr = η·‖w‖ / (‖g‖ + β·‖w‖)        if ‖w‖ > 0 and ‖g‖ > 0, else 1
        v ← m·v + γ_t·local_lr·(g + β·w)
        w ← w − v

    * ‖g‖ is the norm of the raw gradient: weight decay enters the update once, never the norm.
    * The guard is ``> 0`` on both norms, so a zero-initialised bias (‖w‖ = 0) still moves with local_lr = 1.
    * ``clip=True`` caps the ratio at 1 (local_lr = min(local_lr, 1)): no tensor's rate γ_t·local_lr exceeds
      the global rate γ_t (LARC's "clip" mode in this parametrisation).
    * Excluded tensors (by default every tensor with ``ndim <= 1``: biases, BatchNorm scales and shifts) get
      neither the trust ratio nor weight decay: plain momentum SGD, v ← m·v + γ_t·g, w ← w − v.

    Args:
        params: parameters or parameter groups. Group keys: the arguments below, and ``lars``: ``True`` puts
            every tensor of the group under the trust ratio and weight decay, ``False`` excludes every tensor of
            the group, ``None`` (default) decides per tensor by ``exclude_1d``.
        lr: global learning rate γ_t (set ``group["lr"]`` per step for a schedule); a float or a 0-dim tensor.
        momentum: m in [0, 1).
        weight_decay: β ≥ 0, applied inside the update of trust-ratio tensors only.
        trust_coefficient: η > 0 (0.001 in the authors' code).
        clip: cap the trust ratio at 1.
        exclude_1d: exclude tensors with ``ndim <= 1`` from trust ratio and weight decay.

    The state of a tensor is its velocity v (``momentum_buffer``); none is kept without momentum.
    """

    def __init__(self, params: Iterable[Any], lr: float | Tensor = required, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001, clip: bool = False,
                 exclude_1d: bool = True) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        clip=clip, exclude_1d=exclude_1d, lars=None)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        check_group(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("lars", None)
            group.setdefault("clip", False)
            group.setdefault("exclude_1d", True)

    uses_trust_ratio = staticmethod(uses_trust_ratio)

    def velocity(self, param: Tensor) -> Tensor:
        """The velocity v of ``param``, zeros before its first step."""
        buffer = self.state.get(param, {}).get(MOMENTUM_BUFFER)
        return torch.zeros_like(param) if buffer is None else buffer.clone()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LARS update of every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        """The update of every parameter of ``group`` that has a gradient, one tensor at a time."""
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for w in group["params"]:
            g = w.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("LARS does not support sparse gradients")
            if self.uses_trust_ratio(group, w):
                rate = lr * self.local_lr(group, w, g)
                direction = g.add(w, alpha=weight_decay)
            else:
                rate, direction = lr, g
            if momentum == 0:
                w.sub_(direction * rate)
                continue
            state = self.state[w]
            if MOMENTUM_BUFFER not in state:
                state[MOMENTUM_BUFFER] = torch.zeros_like(w)
            v = state[MOMENTUM_BUFFER]
            v.mul_(momentum).add_(direction * rate)
            w.sub_(v)

    @staticmethod
    def local_lr(group: dict[str, Any], w: Tensor, g: Tensor) -> Tensor:
        """η·‖w‖ / (‖g‖ + β·‖w‖) where both norms are nonzero, else 1 (capped at 1 with ``clip``): a 0-dim tensor."""
        dtype = scalar_dtype(w.dtype)
        w_norm = torch.linalg.vector_norm(w, dtype=dtype)
        g_norm = torch.linalg.vector_norm(g, dtype=dtype)
        ratio = group["trust_coefficient"] * w_norm / (g_norm + group["weight_decay"] * w_norm)
        local_lr = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
        return local_lr.clamp(max=1.0) if group["clip"] else local_lr
