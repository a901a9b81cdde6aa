"""LARS (layer-wise adaptive rate scaling) for PyTorch: exact math, multi-tensor, no host synchronisation.

The algorithm (You, Gitman, Ginsburg 2017; ``shared/REFERENCE.md``), for every weight tensor w with gradient g,
global learning rate γ_t, trust coefficient η, weight decay β and momentum m::

    local_lr = η·‖w‖ / (‖g‖ + β·‖w‖)        if ‖w‖ > 0 and ‖g‖ > 0, else 1
    v ← m·v + γ_t·local_lr·(g + β·w)
    w ← w − v

* ‖g‖ is the norm of the raw gradient: weight decay enters the update once, never the norm.
* The guard is ``> 0`` on both norms, so a zero-initialised bias (‖w‖ = 0) still moves with local_lr = 1.
* ``clip=True`` caps the ratio at 1 (local_lr = min(local_lr, 1)), so the effective rate γ_t·local_lr of a tensor
  never exceeds the global rate γ_t (LARC's "clip" mode expressed in this parametrisation).
* Excluded tensors (by default every tensor with ``ndim <= 1``: biases, BatchNorm scales and shifts) get neither
  the trust ratio nor weight decay: plain momentum SGD, v ← m·v + γ_t·g, w ← w − v.

Parameter-group keys: ``lr``, ``momentum``, ``weight_decay``, ``trust_coefficient``, ``clip``, ``exclude_1d`` and
``lars``: ``True`` puts every tensor of the group under the trust ratio and weight decay, ``False`` excludes every
tensor of the group, ``None`` (default) decides per tensor by ``exclude_1d``.

How the update is computed (the step is memory-bound, so it is written to touch parameter memory few times)
---------------------------------------------------------------------------------------------------------------
The velocity is not stored as v. Each tensor keeps an accumulator ``a`` and two per-tensor scalars ``c``
(``accumulator_scale``) and ``α`` (``weight_share``) with

    v = c·a + α·w.

With s = γ_t·local_lr (and β = 0 for excluded tensors), one step is

    k = m·α + s·β
    a ← a + (s / (m·c))·g                       (foreach addcmul: read a, g; write a)
    w ← (1 − k)·w − m·c·a                       (foreach mul + addcmul: read w, a; write w)
    α ← k / (1 − k);   c ← m·c / (1 − k)

which is exactly v_new = m·v + s·(g + β·w), w_new = w − v_new: substituting v = c·a + α·w gives
w_new = (1 − k)·w − (m·c·a_old + s·g) and v_new = w − w_new; choosing α_new = k/(1 − k) makes the part of v_new
proportional to w_new vanish from the accumulator, leaving c_new·a_new = v_new − α_new·w_new. The momentum decay
(m·v) and the weight decay (β·w) thereby become changes of two scalars instead of extra passes over the tensors.
Start: a = 0, c = 1, α = 0 (v = 0). Since 0 ≤ k < 1, c shrinks by at most a factor m per step, so a grows by at
most 1/m per step; every ``rescale_interval(m)`` steps the accumulator is renormalised (a ← c·a, c ← 1) to keep
it within 2**16 of the velocity's scale (one extra pass every ~100 steps at m = 0.9). This needs
γ_t·local_lr·β < 1, which holds for any sane setting (plain SGD would flip the sign of the weights otherwise).

Memory traffic per LARS tensor and step: the two norms read w and g, then addcmul (a, g), mul (w), addcmul (w, a):
ten tensor-sized touches, of which only five (read w, g, a; write w, a) reach DRAM because the tensors are
processed in chunks of ``chunk_bytes`` (default 4 MiB on CPU) that stay in cache between the norms and the update.
``torch.optim.SGD(momentum, weight_decay, foreach=True)`` makes eleven touches (g + β·w into a temporary, m·v,
v + temporary, w − v), each foreach op sweeping the whole model. The trust ratios are computed on the device with
``torch.where`` from ``torch._foreach_norm`` results and passed to the foreach ops as lists of 0-dim tensors:
``step()`` never calls ``.item()``, ``.tolist()`` or ``bool()`` on a tensor (no host synchronisation).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, required

__all__ = ["LARS", "rescale_interval", "DEFAULT_CPU_CHUNK_BYTES"]

# Parameter bytes per chunk on CPU: a chunk's weights, gradients and accumulators (3x this) stay in a 32 MiB L3
# between the norm pass and the update; measured in benchmarks/bench_lars.py (1 to 8 MiB are all close).
DEFAULT_CPU_CHUNK_BYTES = 4 << 20

# The accumulator may grow to this multiple of the velocity's scale before it is renormalised.
_MAX_ACCUMULATOR_GROWTH = 2.0**16

_ACCUMULATOR = "momentum_accumulator"
_SCALE = "accumulator_scale"
_WEIGHT_SHARE = "weight_share"
_SINCE_RESCALE = "steps_since_rescale"


def rescale_interval(momentum: float) -> int:
    """Steps after which the accumulator is renormalised: the largest n with momentum**-n <= 2**16."""
    if momentum <= 0.0:
        return 1
    return max(1, int(math.log(_MAX_ACCUMULATOR_GROWTH) / -math.log(momentum)))


def _scalar_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-tensor scalars (norms, ratios, c, α): float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


class LARS(Optimizer):
    """Momentum SGD with the LARS per-tensor trust ratio (see the module docstring for the math).

    Args:
        params: parameters or parameter groups (group keys: see the module docstring).
        lr: global learning rate γ_t (set ``group["lr"]`` per step for a schedule); a float or a 0-dim tensor.
        momentum: m in [0, 1).
        weight_decay: β ≥ 0, applied inside the update of LARS tensors only.
        trust_coefficient: η > 0 (0.001 in the authors' code).
        clip: cap the trust ratio at 1 so that no tensor's rate exceeds the global rate.
        exclude_1d: exclude tensors with ``ndim <= 1`` (biases, BatchNorm) from trust ratio and weight decay.
        chunk_bytes: parameter bytes processed together (norms then update, while in cache); ``None`` = 4 MiB
            on CPU and one chunk per device and dtype elsewhere, ``0`` = one chunk per device and dtype.
    """

    def __init__(self, params: Iterable[Any], lr: float | Tensor = required, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001, clip: bool = False,
                 exclude_1d: bool = True, *, chunk_bytes: int | None = None) -> None:
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                        or chunk_bytes < 0):
            raise ValueError(f"LARS chunk_bytes must be None or an int >= 0, got {chunk_bytes!r}")
        self._chunk_bytes = chunk_bytes
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        clip=clip, exclude_1d=exclude_1d, lars=None)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_number("lr", group["lr"], 0.0, tensor_ok=True)
        _check_number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        _check_number("weight_decay", group["weight_decay"], 0.0)
        _check_number("trust_coefficient", group["trust_coefficient"], 0.0, low_open=True)
        if group["lars"] not in (None, True, False):
            raise ValueError(f"LARS group key 'lars' must be True, False or None, got {group['lars']!r}")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_chunk_bytes", None)
        for group in self.param_groups:
            group.setdefault("lars", None)
            group.setdefault("clip", False)
            group.setdefault("exclude_1d", True)

    @staticmethod
    def uses_trust_ratio(group: dict[str, Any], param: Tensor) -> bool:
        """Whether ``param`` of ``group`` gets the trust ratio and weight decay (else: plain momentum SGD)."""
        if group["lars"] is not None:
            return bool(group["lars"])
        return not (group["exclude_1d"] and param.ndim <= 1)

    def velocity(self, param: Tensor) -> Tensor:
        """The momentum buffer v of the module docstring's math (v = c·a + α·w), zeros before the first step."""
        state = self.state.get(param)
        if not state or _ACCUMULATOR not in state:
            return torch.zeros_like(param)
        return (state[_SCALE] * state[_ACCUMULATOR] + state[_WEIGHT_SHARE] * param).to(param.dtype)

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

    # -- internals -------------------------------------------------------------------------------------------

    def _chunks(self, params: list[Tensor]) -> list[list[Tensor]]:
        """``params`` split by (device, dtype), then into runs of at most ``chunk_bytes`` (one tensor at least)."""
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for p in params:
            by_kind[(p.device, p.dtype)].append(p)
        chunks: list[list[Tensor]] = []
        for (device, _), same in by_kind.items():
            budget = self._chunk_bytes
            if budget is None:
                budget = DEFAULT_CPU_CHUNK_BYTES if device.type == "cpu" else 0
            if budget == 0:
                chunks.append(same)
                continue
            current: list[Tensor] = []
            size = 0
            for p in same:
                nbytes = p.numel() * p.element_size()
                if current and size + nbytes > budget:
                    chunks.append(current)
                    current, size = [], 0
                current.append(p)
                size += nbytes
            if current:
                chunks.append(current)
        return chunks

    def _state_of(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        sdtype = _scalar_dtype(p.dtype)
        if _ACCUMULATOR not in state:
            state[_ACCUMULATOR] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state[_SCALE] = torch.ones((), dtype=sdtype, device=p.device)
            state[_WEIGHT_SHARE] = torch.zeros((), dtype=sdtype, device=p.device)
            state[_SINCE_RESCALE] = 0
        elif state[_SCALE].dtype != sdtype:
            # Optimizer.load_state_dict casts floating state to the parameter's dtype; keep the scalars precise.
            state[_SCALE] = state[_SCALE].to(sdtype)
            state[_WEIGHT_SHARE] = state[_WEIGHT_SHARE].to(sdtype)
        return state

    def _step_group(self, group: dict[str, Any]) -> None:
        lars_params: list[Tensor] = []
        plain_params: list[Tensor] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LARS does not support sparse gradients")
            (lars_params if self.uses_trust_ratio(group, p) else plain_params).append(p)
        for chunk in self._chunks(lars_params):
            self._update(group, chunk, trust_ratio=True)
        for chunk in self._chunks(plain_params):
            self._update(group, chunk, trust_ratio=False)

    def _update(self, group: dict[str, Any], params: list[Tensor], trust_ratio: bool) -> None:
        """Update one chunk (same device and dtype). All arithmetic on norms and scalars stays on the device.

        The scalar work is a few dozen tiny ops per chunk whatever its size, so it is written with as few ops as
        the math allows.
        """
        grads = [p.grad for p in params]
        dtype, device, n = params[0].dtype, params[0].device, len(params)
        sdtype = _scalar_dtype(dtype)
        lr, momentum = group["lr"], group["momentum"]
        if trust_ratio:
            weight_decay, eta = group["weight_decay"], group["trust_coefficient"]
            norms = torch.stack(torch._foreach_norm(params + grads, 2, dtype=sdtype))
            w_norm, g_norm = norms[:n], norms[n:]
            # local_lr/η = ‖w‖/(‖g‖ + β‖w‖) where both norms are > 0, else 1/η; then s = γ_t·η·(local_lr/η).
            # γ_t enters only through a product (a float, or a CPU-scalar or device tensor: no copy, no sync).
            ratio = torch.where(torch.minimum(w_norm, g_norm) > 0,
                                w_norm / torch.add(g_norm, w_norm, alpha=weight_decay), 1.0 / eta)
            if group["clip"]:
                ratio = ratio.clamp(max=1.0 / eta)  # local_lr ≤ 1
            rate = ratio * (eta * lr)
        else:
            weight_decay = 0.0
            rate = torch.full((n,), lr, dtype=sdtype, device=device) if not isinstance(lr, Tensor) else \
                torch.ones(n, dtype=sdtype, device=device) * lr

        if momentum == 0:
            # v = s·(g + β·w): no state needed, w ← (1 − s·β)·w − s·g.
            if weight_decay != 0:
                torch._foreach_mul_(params, _per_tensor(1 - weight_decay * rate, dtype))
            torch._foreach_addcmul_(params, grads, _per_tensor(-rate, dtype))
            return

        states = [self._state_of(p) for p in params]
        interval = rescale_interval(momentum)
        due = [st for st in states if st[_SINCE_RESCALE] >= interval]
        if due:  # a ← c·a, c ← 1 (Python-side counters: no tensor is inspected)
            torch._foreach_mul_([st[_ACCUMULATOR] for st in due], [st[_SCALE].to(dtype) for st in due])
            for st in due:
                st[_SCALE].fill_(1.0)
                st[_SINCE_RESCALE] = 0
        accumulators = [st[_ACCUMULATOR] for st in states]
        scales = [st[_SCALE] for st in states]
        shares = [st[_WEIGHT_SHARE] for st in states]
        decayed_scale = torch.stack(scales) * momentum                              # m·c
        k = torch.add(torch.stack(shares) * momentum, rate, alpha=weight_decay)     # m·α + s·β
        keep = 1 - k
        # rows: a's gradient factor s/(m·c), w's factor 1 − k, a's factor in w −m·c; new c, new α
        factors = torch.stack([rate / decayed_scale, keep, -decayed_scale, decayed_scale / keep, k / keep])
        flat = list(factors.view(-1).unbind())  # one unbind for all five rows
        update = flat[:3 * n] if dtype == sdtype else list(factors[:3].to(dtype).view(-1).unbind())
        torch._foreach_addcmul_(accumulators, grads, update[:n])
        torch._foreach_mul_(params, update[n:2 * n])
        torch._foreach_addcmul_(params, accumulators, update[2 * n:3 * n])
        torch._foreach_copy_(scales, flat[3 * n:4 * n])
        torch._foreach_copy_(shares, flat[4 * n:])
        for st in states:
            st[_SINCE_RESCALE] += 1


def _per_tensor(values: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """A 1-D tensor of per-tensor multipliers as the list of 0-dim tensors the foreach ops take."""
    return list(values.to(dtype).unbind())
