"""The fast LARS: :class:`FastLARS`, the update of :class:`scaling.optim.LARS` (the math is in its docstring)
computed with few passes over memory and no host synchronisation. The trainer uses this one; tests/test_lars_fast.py
holds both of its paths to the reference class.

Two paths share the state format, so a checkpoint written by one resumes on the other: the chunked path (the CPU
default) and the fused path (every other device's default).

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

Once the passes are few, what is left is the fixed cost of the tiny ops on the scalars (on a CPU they rival the
passes once a chunk has streamed through the caches). So the first step builds a plan per parameter group,
reused while the set of parameters with gradients stays the same: the chunks, and per device and dtype persistent
buffers for c, α, the ratios and the three per-tensor factors, whose 0-dim views the foreach ops take. The
factors that do not depend on this step's norms (m·c, 1 − m·α, γ/(m·c)) are computed for all tensors at once
before the first chunk, c and α after the last one; a chunk adds only its norms and six tiny ops.

The fused path (``fused=True``; the default for every device but the CPU)
-------------------------------------------------------------------------
On a GPU the chunked path pays in launches rather than memory: a foreach op whose per-tensor multipliers are a
list of 0-dim tensors cannot use the multi-tensor kernel (that needs equal shapes), so it falls back to one kernel
per tensor, three ops × 161 tensors for ResNet-50 (about twice SGD foreach's step time:
``benchmarks/bench_lars.py --device cuda``). The fused path makes every tensor-sized op a multi-tensor kernel over
all tensors of the segment at once, with a fixed number of launches whatever the number of tensors:

    norms      one torch._foreach_norm over all trust-ratio weights and gradients, stacked into one buffer
    rates      local_lr of every tensor in a handful of vectorised ops on the device (1 for excluded tensors)
    factor     f = γ·local_lr/(m·c) per tensor, expanded to one value per parameter element by a single gather
               (``index_select`` through a persistent element → tensor index): the foreach ops then take
               tensor lists of equal shapes, which is what the multi-tensor kernels need
    d          g + β·w for the trust-ratio tensors (one foreach add; g itself for the others)
    a ← a + f·d                 (one foreach addcmul)
    w ← w − m·c·a               (one foreach add with a Python scalar)

It keeps one velocity scale c for the whole segment, with α = 0 (v = c·a): c ← m·c is then the same for every
tensor, a host float known without reading the device, and the weight update needs no per-tensor factor. The
state is the chunked path's (``momentum_accumulator``, ``accumulator_scale`` = c, ``weight_share`` = 0,
``steps_since_rescale``; and ``accumulator_scale_value``, c as a Python float), so either path resumes from the
other's state_dict: when a fused segment is built from states the chunked path wrote, every accumulator is
folded to a ← c_i·a + α_i·w, c = 1 (one pass, once); states the fused path wrote resume as they are, bit for bit.
Cost: 14 tensor-sized memory touches per step (norms 2, d 3, the gather 2 with its 4-byte index, a 4, w 3)
against the chunked path's 5 that reach DRAM on a CPU, plus a parameter-sized buffer for f and the index. On a
CPU the chunked path is faster and stays the default there.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import required

from scaling.optim import LARS
from scaling.optim import scalar_dtype as _scalar_dtype

__all__ = ["FastLARS", "rescale_interval", "DEFAULT_CPU_CHUNK_BYTES"]

# Parameter bytes per chunk on CPU: a chunk's weights, gradients and accumulators (3x this) stay in a 32 MiB L3
# between the norm pass and the update; measured in benchmarks/bench_lars.py (1 to 8 MiB are all close).
DEFAULT_CPU_CHUNK_BYTES = 4 << 20

# The accumulator may grow to this multiple of the velocity's scale before it is renormalised.
_MAX_ACCUMULATOR_GROWTH = 2.0**16

_ACCUMULATOR = "momentum_accumulator"
_SCALE = "accumulator_scale"
_WEIGHT_SHARE = "weight_share"
_SINCE_RESCALE = "steps_since_rescale"
# The fused path's c as a Python float (it keeps c on the host): a checkpoint it wrote resumes bit for bit.
_HOST_SCALE = "accumulator_scale_value"


def rescale_interval(momentum: float) -> int:
    """Steps after which the accumulator is renormalised: the largest n with momentum**-n <= 2**16."""
    if momentum <= 0.0:
        return 1
    return max(1, int(math.log(_MAX_ACCUMULATOR_GROWTH) / -math.log(momentum)))


class FastLARS(LARS):
    """:class:`scaling.optim.LARS`'s update in a fixed number of multi-tensor ops per chunk (module docstring).

    Args: those of :class:`scaling.optim.LARS`, and
        chunk_bytes: parameter bytes processed together (norms then update, while in cache); ``None`` = 4 MiB
            on CPU and one chunk per device and dtype elsewhere, ``0`` = one chunk per device and dtype.
            Chunked path only.
        fused: ``True``: the fused multi-tensor path everywhere; ``False``: the chunked path everywhere;
            ``None`` (default): fused on every device but the CPU, chunked on the CPU, chunked everywhere when
            ``chunk_bytes`` is given.

    The state is not the velocity itself (``velocity()`` computes it): see the module docstring.
    """

    def __init__(self, params: Iterable[Any], lr: float | Tensor = required, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001, clip: bool = False,
                 exclude_1d: bool = True, *, chunk_bytes: int | None = None, fused: bool | None = None) -> None:
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                        or chunk_bytes < 0):
            raise ValueError(f"LARS chunk_bytes must be None or an int >= 0, got {chunk_bytes!r}")
        if fused not in (None, True, False):
            raise ValueError(f"LARS fused must be True, False or None, got {fused!r}")
        if fused and chunk_bytes is not None:
            raise ValueError("LARS chunk_bytes applies to the chunked path only, not with fused=True")
        self._chunk_bytes = chunk_bytes
        self._fused = fused
        self._plans: dict[int, tuple[dict[str, Any], tuple[Any, ...], list[_Segment | _FusedSegment]]] = {}
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         trust_coefficient=trust_coefficient, clip=clip, exclude_1d=exclude_1d)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._plans.clear()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_chunk_bytes", None)
        self.__dict__.setdefault("_fused", None)
        self._plans = {}  # (re)loaded states: the next step rebuilds its plans from them

    def velocity(self, param: Tensor) -> Tensor:
        """The velocity v of ``param`` (v = c·a + α·w), zeros before its first step."""
        state = self.state.get(param)
        if not state or _ACCUMULATOR not in state:
            return torch.zeros_like(param)
        return (state[_SCALE] * state[_ACCUMULATOR] + state[_WEIGHT_SHARE] * param).to(param.dtype)

    # -- internals -------------------------------------------------------------------------------------------

    def _chunks(self, params: list[Tensor]) -> list[list[Tensor]]:
        """``params`` (one device and dtype) in runs of at most ``chunk_bytes`` (one tensor at least)."""
        budget = self._chunk_bytes
        if budget is None:
            budget = DEFAULT_CPU_CHUNK_BYTES if params and params[0].device.type == "cpu" else 0
        if budget == 0:
            return [params] if params else []
        chunks: list[list[Tensor]] = []
        current: list[Tensor] = []
        size = 0
        for p in params:
            nbytes = p.numel() * p.element_size()
            if current and size + nbytes > budget:
                chunks.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            chunks.append(current)
        return chunks

    def uses_fused_path(self, device: torch.device) -> bool:
        """Whether the tensors on ``device`` take the fused path (see ``fused``)."""
        if self._fused is not None:
            return self._fused
        return device.type != "cpu" and self._chunk_bytes is None

    def _new_plan(self, group: dict[str, Any], with_grad: list[Tensor]) -> list[_Segment | _FusedSegment]:
        """Segments (one per device and dtype) of ``with_grad``, with their chunks, states and scalar buffers.

        Built on the first step and again whenever the set of parameters with gradients, the exclusion rule, η or
        whether there is momentum changes, or a state is loaded; every later step reuses it, so a step does no
        per-tensor Python work beyond reading ``.grad``.
        """
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for p in with_grad:
            by_kind[(p.device, p.dtype)].append(p)
        return [self._new_fused_segment(group, same) if self.uses_fused_path(same[0].device)
                else self._new_segment(group, same) for same in by_kind.values()]

    def _new_segment(self, group: dict[str, Any], params: list[Tensor]) -> _Segment:
        lars_params = [p for p in params if self.uses_trust_ratio(group, p)]
        plain_params = [p for p in params if not self.uses_trust_ratio(group, p)]
        params = lars_params + plain_params  # the trust-ratio tensors first: one index range each
        dtype, device, total = params[0].dtype, params[0].device, len(params)
        sdtype = _scalar_dtype(dtype)
        scalars = torch.empty((2, total), dtype=sdtype, device=device)
        states = []
        # Without momentum the update needs no state (v = s·(g + β·w)): no accumulator is allocated.
        for j, p in enumerate(params if group["momentum"] != 0 else ()):
            state = self.state[p]
            if _ACCUMULATOR not in state:
                state[_ACCUMULATOR] = torch.zeros_like(p, memory_format=torch.preserve_format)
                scalars[0, j], scalars[1, j] = 1.0, 0.0
                state[_SINCE_RESCALE] = 0
            else:  # a loaded or earlier state (Optimizer.load_state_dict casts it to the parameter's dtype)
                scalars[0, j].copy_(state[_SCALE])
                scalars[1, j].copy_(state[_WEIGHT_SHARE])
                state.pop(_HOST_SCALE, None)  # the fused path's copy of c: this path changes c per tensor
            state[_SCALE], state[_WEIGHT_SHARE] = scalars[0, j], scalars[1, j]  # views: updated in place
            states.append(state)
        factors = torch.zeros((3, total), dtype=sdtype, device=device)
        cast = None if dtype == sdtype else torch.zeros((3, total), dtype=dtype, device=device)
        ratio = torch.zeros(total, dtype=sdtype, device=device)
        eta = torch.ones(total, dtype=sdtype, device=device)
        eta[:len(lars_params)] = group["trust_coefficient"]
        factor_views = [list(row.unbind()) for row in (factors if cast is None else cast)]
        chunks = []
        lo = 0
        for trust_ratio, subset in ((True, lars_params), (False, plain_params)):
            for members in self._chunks(subset):
                hi = lo + len(members)
                norms = torch.zeros(2 * len(members), dtype=sdtype, device=device) if trust_ratio else ratio[:0]
                chunks.append(_Chunk(
                    params=members, accumulators=[st[_ACCUMULATOR] for st in states[lo:hi]],
                    trust_ratio=trust_ratio, norms=norms, w_norm=norms[:len(members)], g_norm=norms[len(members):],
                    ratio=ratio[lo:hi], grad_row=factors[0, lo:hi], keep_row=factors[1, lo:hi],
                    factors=factors[:, lo:hi], cast=None if cast is None else cast[:, lo:hi],
                    grad_factor=factor_views[0][lo:hi], keep_factor=factor_views[1][lo:hi],
                    accumulator_factor=factor_views[2][lo:hi]))
                lo = hi
        return _Segment(chunks=chunks, states=states, accumulators=[st[_ACCUMULATOR] for st in states],
                        scalars=scalars, work=torch.zeros((2, total), dtype=sdtype, device=device),
                        factors=factors, ratio=ratio, eta=eta,
                        since_rescale=max((st[_SINCE_RESCALE] for st in states), default=0))

    def _new_fused_segment(self, group: dict[str, Any], params: list[Tensor]) -> _FusedSegment:
        """The fused path's plan for ``params`` (one device and dtype): trust-ratio tensors first, the states on one
        scale c (as the fused path left them, or folded: a ← c_i·a + α_i·w, c = 1, α = 0), the element → tensor
        index and the factor buffer."""
        lars_params = [p for p in params if self.uses_trust_ratio(group, p)]
        params = lars_params + [p for p in params if not self.uses_trust_ratio(group, p)]
        dtype, device, total = params[0].dtype, params[0].device, len(params)
        sdtype = _scalar_dtype(dtype)
        scalars = torch.zeros((2, total), dtype=sdtype, device=device)
        scalars[0] = 1.0
        states = [self.state[p] for p in params] if group["momentum"] != 0 else []
        scale = 1.0
        host_scales = {st.get(_HOST_SCALE) for st in states}
        if len(host_scales) == 1 and None not in host_scales:
            # every state was written by the fused path with the same c (α = 0): continue with it as it is
            scale = host_scales.pop()
        else:
            for p, state in zip(params, states, strict=False):
                if _ACCUMULATOR not in state:
                    state[_ACCUMULATOR] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:  # v = c·a + α·w of the chunked path's state (or of mixed plans): fold it into a, c = 1
                    state[_ACCUMULATOR].mul_(state[_SCALE].to(dtype)).addcmul_(p, state[_WEIGHT_SHARE].to(dtype))
                state[_SINCE_RESCALE], state[_HOST_SCALE] = 0, 1.0
        scalars[0] = scale
        for j, state in enumerate(states):
            state[_SCALE], state[_WEIGHT_SHARE] = scalars[0, j], scalars[1, j]  # views: c, and α = 0
        # Element → tensor index and the expanded factor: views of one buffer with each parameter's strides, so
        # that every list a foreach op takes has equal shapes and strides (the multi-tensor kernels' condition).
        numels = [p.numel() for p in params]
        owner = torch.empty(sum(numels), dtype=torch.int32, device=device)
        expanded = torch.empty(sum(numels), dtype=dtype, device=device)
        views, start = [], 0
        for j, (p, n) in enumerate(zip(params, numels, strict=True)):
            owner[start:start + n].fill_(j)
            span = 1 + sum((size - 1) * stride for size, stride in zip(p.shape, p.stride(), strict=True))
            fits = n > 0 and min(p.stride(), default=1) >= 0 and span <= n
            views.append(expanded.as_strided(p.shape, p.stride(), start) if fits
                         else expanded[start:start + n].view(p.shape))
            start += n
        n_lars = len(lars_params)
        rate = torch.ones(total, dtype=sdtype, device=device)  # local_lr; stays 1 for excluded tensors
        return _FusedSegment(
            params=params, n_lars=n_lars, states=states, accumulators=[st[_ACCUMULATOR] for st in states],
            scalars=scalars, norms=torch.zeros(2 * n_lars, dtype=sdtype, device=device), rate=rate,
            one=torch.ones((), dtype=sdtype, device=device),
            factor=torch.zeros(total, dtype=sdtype, device=device),
            factor_cast=None if dtype == sdtype else torch.zeros(total, dtype=dtype, device=device),
            owner=owner, expanded=expanded, expanded_views=views, scale=scale,
            since_rescale=max((st[_SINCE_RESCALE] for st in states), default=0))

    def _fused_update(self, group: dict[str, Any], seg: _FusedSegment) -> None:
        """One step of a fused segment: a fixed number of multi-tensor ops, whatever the number of tensors."""
        lr, momentum, eta, weight_decay = (group["lr"], group["momentum"], group["trust_coefficient"],
                                           group["weight_decay"])
        grads = [p.grad for p in seg.params]
        n_lars = seg.n_lars
        if momentum != 0 and seg.since_rescale >= rescale_interval(momentum):  # a ← c·a, c ← 1
            torch._foreach_mul_(seg.accumulators, seg.scale)
            seg.scale, seg.since_rescale = 1.0, 0
            seg.scalars[0].fill_(1.0)
        if n_lars:
            torch.stack(torch._foreach_norm(seg.params[:n_lars] + grads[:n_lars], 2, dtype=seg.norms.dtype),
                        out=seg.norms)
            w_norm, g_norm = seg.norms[:n_lars], seg.norms[n_lars:]
            # local_lr = η‖w‖/(‖g‖ + β‖w‖) where both norms are nonzero, else 1 (a zero-initialised bias moves)
            trusted = torch.div(w_norm, torch.add(g_norm, w_norm, alpha=weight_decay)).mul_(eta)
            torch.where(torch.logical_and(w_norm, g_norm), trusted, seg.one, out=seg.rate[:n_lars])
            if group["clip"]:
                seg.rate[:n_lars].clamp_(max=1.0)
        # f = γ·local_lr/(m·c) (momentum) or γ·local_lr (no momentum; then the update is w ← w − f·d)
        step_scale = momentum * seg.scale if momentum != 0 else 1.0
        torch.mul(seg.rate, lr / step_scale, out=seg.factor)  # a tensor LR stays on its device
        factor = seg.factor
        if seg.factor_cast is not None:
            factor = seg.factor_cast.copy_(seg.factor)  # parameters in a lower precision than the scalars
        torch.index_select(factor, 0, seg.owner, out=seg.expanded)
        # d = g + β·w for the trust-ratio tensors (weight decay enters the update once, never the norm)
        lars_d = torch._foreach_add(grads[:n_lars], seg.params[:n_lars], alpha=weight_decay) if (
            n_lars and weight_decay != 0) else grads[:n_lars]
        directions = list(lars_d) + grads[n_lars:]
        if momentum == 0:
            torch._foreach_addcmul_(seg.params, directions, seg.expanded_views, value=-1.0)   # w ← w − f·d
            return
        torch._foreach_addcmul_(seg.accumulators, directions, seg.expanded_views)  # a ← a + f·d
        seg.scale *= momentum                                                       # c ← m·c (v = c·a)
        torch._foreach_add_(seg.params, seg.accumulators, alpha=-seg.scale)         # w ← w − c·a
        seg.scalars[0].fill_(seg.scale)
        seg.since_rescale += 1
        for st in seg.states:
            st[_SINCE_RESCALE], st[_HOST_SCALE] = seg.since_rescale, seg.scale

    def _step_group(self, group: dict[str, Any]) -> None:
        with_grad = [p for p in group["params"] if p.grad is not None]
        for p in with_grad:
            if p.grad.is_sparse:
                raise RuntimeError("LARS does not support sparse gradients")
        key = (group["lars"], group["exclude_1d"], group["trust_coefficient"], group["momentum"] == 0,
               *map(id, with_grad))
        cached = self._plans.get(id(group))
        if cached is None or cached[0] is not group or cached[1] != key:
            cached = (group, key, self._new_plan(group, with_grad))
            self._plans[id(group)] = cached
        for segment in cached[2]:
            if isinstance(segment, _FusedSegment):
                self._fused_update(group, segment)
            elif group["momentum"] == 0:
                self._update_without_momentum(group, segment)
            else:
                self._update(group, segment)

    @staticmethod
    def _trust_ratio(group: dict[str, Any], chunk: _Chunk, grads: list[Tensor], inv_eta: Tensor) -> Tensor:
        """local_lr/η of every tensor of the chunk, written into ``chunk.ratio`` (on the device, no sync)."""
        torch.stack(torch._foreach_norm(chunk.params + grads, 2, dtype=chunk.norms.dtype), out=chunk.norms)
        w_norm, g_norm = chunk.w_norm, chunk.g_norm
        # ‖w‖/(‖g‖ + β‖w‖) where both norms are nonzero, else 1/η (a zero-initialised bias still moves)
        torch.where(torch.logical_and(w_norm, g_norm), w_norm / torch.add(g_norm, w_norm, alpha=group["weight_decay"]),
                    inv_eta, out=chunk.ratio)
        if group["clip"]:
            chunk.ratio.clamp_(max=inv_eta)  # local_lr ≤ 1
        return chunk.ratio

    def _update(self, group: dict[str, Any], segment: _Segment) -> None:
        """One momentum step of one segment: the module docstring's update, chunk by chunk.

        The scalar math is written into the segment's persistent buffers, and the foreach ops read the
        per-tensor factors through views made once: per chunk, six tiny ops besides the norms and the three
        tensor-sized foreach ops, so that the step stays memory-bound.
        """
        lr, momentum, eta = group["lr"], group["momentum"], group["trust_coefficient"]
        scalars, work, factors = segment.scalars, segment.work, segment.factors
        if segment.since_rescale >= rescale_interval(momentum):  # a ← c·a, c ← 1
            scale = scalars[0].to(segment.accumulators[0].dtype)
            torch._foreach_mul_(segment.accumulators, list(scale.unbind()))
            scalars[0].fill_(1.0)
            segment.since_rescale = 0
        # Whole segment first: work = (m·c, m·α); factors = (η·γ/(m·c), 1 − m·α, −m·c), with η = 1 for the
        # tensors without trust ratio. Each trust-ratio chunk then multiplies in its ratio r = local_lr/η:
        # s = γ·η·r, a's gradient factor s/(m·c), w's factor 1 − k = 1 − m·α − β·s.
        torch.mul(scalars, momentum, out=work)
        torch.neg(work[0], out=factors[2])
        torch.sub(work[1], 1, out=factors[1]).neg_()
        torch.div(segment.eta, work[0], out=factors[0]).mul_(lr)
        inv_eta = torch.full((), 1.0 / eta, dtype=scalars.dtype, device=scalars.device)
        decay_per_ratio = -group["weight_decay"] * eta * lr  # ∂(1 − k)/∂r; a float or a tensor
        for chunk in segment.chunks:
            grads = [p.grad for p in chunk.params]
            if chunk.trust_ratio:
                ratio = self._trust_ratio(group, chunk, grads, inv_eta)
                chunk.grad_row.mul_(ratio)
                _add_scaled_(chunk.keep_row, ratio, decay_per_ratio)
            if chunk.cast is not None:
                chunk.cast.copy_(chunk.factors)  # parameters in a lower precision than the scalars
            torch._foreach_addcmul_(chunk.accumulators, grads, chunk.grad_factor)      # a ← a + s/(m·c)·g
            torch._foreach_mul_(chunk.params, chunk.keep_factor)                       # w ← (1 − k)·w
            torch._foreach_addcmul_(chunk.params, chunk.accumulators, chunk.accumulator_factor)  # w ← w − m·c·a
        # k = m·α + β·s (r = 0 for the tensors without trust ratio); c ← m·c/(1 − k), α ← k/(1 − k)
        _add_scaled_(work[1], segment.ratio, -decay_per_ratio)
        torch.div(work, factors[1], out=scalars)
        segment.since_rescale += 1
        for st in segment.states:
            st[_SINCE_RESCALE] = segment.since_rescale

    def _update_without_momentum(self, group: dict[str, Any], segment: _Segment) -> None:
        """momentum = 0: v = s·(g + β·w), no state needed: w ← (1 − s·β)·w − s·g."""
        lr, eta, weight_decay = group["lr"], group["trust_coefficient"], group["weight_decay"]
        inv_eta = torch.full((), 1.0 / eta, dtype=segment.scalars.dtype, device=segment.scalars.device)
        for chunk in segment.chunks:
            grads = [p.grad for p in chunk.params]
            dtype = chunk.params[0].dtype
            if chunk.trust_ratio:
                neg_rate = self._trust_ratio(group, chunk, grads, inv_eta) * (-eta * lr)
                if weight_decay != 0:
                    torch._foreach_mul_(chunk.params, _per_tensor(torch.add(1, neg_rate, alpha=weight_decay), dtype))
            else:
                neg_rate = torch.ones_like(chunk.ratio) * -lr
            torch._foreach_addcmul_(chunk.params, grads, _per_tensor(neg_rate, dtype))


@dataclass
class _Chunk:
    """A run of tensors updated together while in cache, with views into its segment's buffers."""

    params: list[Tensor]
    accumulators: list[Tensor]
    trust_ratio: bool
    norms: Tensor              # (2n,): ‖w‖ of every tensor, then ‖g‖ (empty without trust ratio)
    w_norm: Tensor
    g_norm: Tensor
    ratio: Tensor              # the segment's ratio[lo:hi]
    grad_row: Tensor           # the segment's factors[0, lo:hi] and factors[1, lo:hi]
    keep_row: Tensor
    factors: Tensor            # factors[:, lo:hi]
    cast: Tensor | None        # a copy of ``factors`` in the parameters' dtype when it differs
    grad_factor: list[Tensor]  # 0-dim views of the factor rows (or of ``cast``), made once
    keep_factor: list[Tensor]
    accumulator_factor: list[Tensor]


@dataclass
class _Segment:
    """The tensors of one parameter group with one device and dtype: trust-ratio chunks first, then the rest."""

    chunks: list[_Chunk]
    states: list[dict[str, Any]]
    accumulators: list[Tensor]
    scalars: Tensor            # (2, N): c and α of every tensor; the states' scalars are views of it
    work: Tensor               # (2, N): m·c, then m·α turned into k
    factors: Tensor            # (3, N): s/(m·c), 1 − k, −m·c
    ratio: Tensor              # (N,): local_lr/η, 0 for the tensors without trust ratio
    eta: Tensor                # (N,): η, 1 for the tensors without trust ratio
    since_rescale: int


@dataclass
class _FusedSegment:
    """The fused path's plan for the tensors of one parameter group with one device and dtype."""

    params: list[Tensor]       # trust-ratio tensors first
    n_lars: int
    states: list[dict[str, Any]]
    accumulators: list[Tensor]
    scalars: Tensor            # (2, N): c (all equal to ``scale``) and α (0); the states' scalars are views of it
    norms: Tensor              # (2·n_lars,): ‖w‖ of every trust-ratio tensor, then ‖g‖
    rate: Tensor               # (N,): local_lr, 1 for the tensors without trust ratio
    one: Tensor                # 1 as a 0-dim tensor (torch.where with out= takes tensors only)
    factor: Tensor             # (N,): γ·local_lr/(m·c)
    factor_cast: Tensor | None  # ``factor`` in the parameters' dtype when it differs
    owner: Tensor              # (elements,) int32: the tensor each parameter element belongs to
    expanded: Tensor           # (elements,): factor[owner]
    expanded_views: list[Tensor]  # ``expanded`` viewed as each parameter (same shape and strides)
    scale: float               # c, the velocity scale of every tensor (v = c·a), known on the host
    since_rescale: int


def _add_scaled_(target: Tensor, source: Tensor, coefficient: float | Tensor) -> None:
    """target += coefficient·source, for a float coefficient or a 0-dim tensor one (no host read)."""
    if isinstance(coefficient, Tensor):
        target.addcmul_(source, coefficient)
    else:
        target.add_(source, alpha=coefficient)


def _per_tensor(values: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """A 1-D tensor of per-tensor multipliers as the list of 0-dim tensors the foreach ops take."""
    return list(values.to(dtype).unbind())
