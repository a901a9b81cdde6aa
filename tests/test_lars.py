"""scaling.optim.LARS, the readable reference, against the update worked out by hand; its options and its state.

The hand-worked cases run on the reference and on both paths of scaling.optim_fast.FastLARS (the trainer's), so a
slip in the reference cannot pass unseen into tests/test_lars_fast.py, which holds the fast paths to it."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from scaling.optim import LARS
from scaling.optim_fast import FastLARS

SHAPES = [(6, 3, 3, 3), (6,), (12, 24), (12,), (5, 12), (5,), (7,)]

# Every LARS in the package: the reference and the two paths of the fast one.
IMPLEMENTATIONS = {"reference": LARS, "chunked": functools.partial(FastLARS, fused=False),
                   "fused": functools.partial(FastLARS, fused=True)}
each_implementation = pytest.mark.parametrize("make", list(IMPLEMENTATIONS.values()), ids=list(IMPLEMENTATIONS))


def gradient_stream(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """Gradients per step; tensor 2 gets an all-zero gradient every fourth step."""
    gen = torch.Generator().manual_seed(seed)
    stream = []
    for t in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) * (0.1 + i) for i, s in enumerate(SHAPES)]
        if t % 4 == 1:
            grads[2].zero_()
        stream.append(grads)
    return stream


def initial_weights(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    weights[1].zero_()  # a zero-initialised bias: must still move (guard is > 0, not >= 0)
    return weights


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b, strict=True))


@each_implementation
def test_trust_ratio_uses_raw_gradient_norm_and_per_tensor_norms(make):
    """One step from zero velocity: v = lr·η‖w‖/(‖g‖+β‖w‖)·(g + βw) per tensor."""
    f64 = dict(dtype=torch.float64)
    w0, w_grad = torch.tensor([[3.0, 4.0]], **f64), torch.tensor([[0.0, 2.0]], **f64)      # ‖w‖ = 5, ‖g‖ = 2
    u0, u_grad = torch.tensor([[0.0, 100.0]], **f64), torch.tensor([[1.0, 0.0]], **f64)    # ‖u‖ = 100, ‖g‖ = 1
    w, u = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(u0.clone())
    w.grad, u.grad = w_grad.clone(), u_grad.clone()
    lr, eta, wd = 0.5, 0.1, 0.01
    make([w, u], lr=lr, momentum=0.9, weight_decay=wd, trust_coefficient=eta).step()
    # per-tensor norms of the raw gradient: not ‖g + βw‖ (weight decay counted twice), not a global norm
    ratio_w = eta * 5 / (2 + wd * 5)
    ratio_u = eta * 100 / (1 + wd * 100)
    assert torch.allclose(w.detach(), w0 - lr * ratio_w * (w_grad + wd * w0), rtol=0, atol=1e-14)
    assert torch.allclose(u.detach(), u0 - lr * ratio_u * (u_grad + wd * u0), rtol=0, atol=1e-14)
    # and the update is applied in place (the add-vs-add_ bug would leave the weights unchanged)
    assert not torch.equal(w.detach(), w0)


@each_implementation
def test_momentum_over_two_steps_by_hand(make):
    """v1 = s1·(g1 + βw0), w1 = w0 − v1; v2 = m·v1 + s2·(g2 + βw1), w2 = w1 − v2, with s = lr·η‖w‖/(‖g‖+β‖w‖)."""
    f64 = dict(dtype=torch.float64)
    w0 = torch.tensor([[3.0, 4.0]], **f64)
    g1, g2 = torch.tensor([[0.0, 2.0]], **f64), torch.tensor([[1.0, -1.0]], **f64)
    lrs, m, eta, wd = (0.5, 0.25), 0.9, 0.1, 0.01
    w = torch.nn.Parameter(w0.clone())
    opt = make([w], lr=lrs[0], momentum=m, weight_decay=wd, trust_coefficient=eta)
    expected, velocity = w0.clone(), torch.zeros_like(w0)
    for lr, g in zip(lrs, (g1, g2), strict=True):
        w_norm, g_norm = float(expected.norm()), float(g.norm())
        velocity = m * velocity + lr * eta * w_norm / (g_norm + wd * w_norm) * (g + wd * expected)
        expected = expected - velocity
        opt.param_groups[0]["lr"] = lr
        w.grad = g.clone()
        opt.step()
    assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-14)
    assert torch.allclose(opt.velocity(w), velocity, rtol=0, atol=1e-14)


@each_implementation
def test_zero_weight_and_zero_gradient_use_ratio_one(make):
    zero_w = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    zero_g = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float64))
    zero_w.grad = torch.full((3, 2), 2.0, dtype=torch.float64)
    zero_g.grad = torch.zeros(3, 2, dtype=torch.float64)
    make([zero_w, zero_g], lr=0.1, momentum=0.9, weight_decay=0.5, trust_coefficient=1e-3).step()
    assert torch.allclose(zero_w.detach(), torch.full((3, 2), -0.2, dtype=torch.float64), rtol=0, atol=1e-15)
    # zero gradient: ratio 1, the update is the weight decay alone: w − lr·β·w
    assert torch.allclose(zero_g.detach(), torch.full((3, 2), 1 - 0.1 * 0.5, dtype=torch.float64), rtol=0, atol=1e-15)


@each_implementation
def test_clip_caps_the_ratio_at_one(make):
    """η = 5 makes the raw ratio 5·5/2 = 12.5; clipped, the step is the global rate's: w − lr·(g + βw)."""
    w0, g = torch.tensor([[3.0, 4.0]], dtype=torch.float64), torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    clipped, unclipped = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    for p, clip in ((clipped, True), (unclipped, False)):
        p.grad = g.clone()
        make([p], lr=0.1, weight_decay=0.0, trust_coefficient=5.0, clip=clip).step()
    assert torch.allclose(clipped.detach(), w0 - 0.1 * g, rtol=0, atol=1e-15)
    assert torch.allclose(unclipped.detach(), w0 - 0.1 * 12.5 * g, rtol=0, atol=1e-14)


@each_implementation
def test_no_momentum_keeps_no_state(make):
    w0, g = torch.tensor([[3.0, 4.0]], dtype=torch.float64), torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    opt = make([w], lr=0.1, momentum=0.0, weight_decay=0.0, trust_coefficient=0.4)
    for _ in range(2):
        w.grad = g.clone()
        opt.step()
    after_one = w0 - 0.1 * 0.4 * 5 / 2 * g
    norm = float(after_one.norm())
    assert torch.allclose(w.detach(), after_one - 0.1 * 0.4 * norm / 2 * g, rtol=0, atol=1e-14)
    assert not any(opt.state.values())   # no velocity to keep: no model-sized buffer either


@each_implementation
def test_excluded_parameters_get_plain_momentum_sgd_without_weight_decay(make):
    weight = torch.nn.Parameter(torch.ones(4, 4))
    bias = torch.nn.Parameter(torch.ones(4))
    forced_plain = torch.nn.Parameter(torch.ones(4, 4))
    forced_lars = torch.nn.Parameter(torch.ones(4))
    for p in (weight, bias, forced_plain, forced_lars):
        p.grad = torch.full_like(p, 0.5)
    opt = make([{"params": [weight, bias]}, {"params": [forced_plain], "lars": False},
                {"params": [forced_lars], "lars": True}], lr=0.1, weight_decay=0.1, trust_coefficient=0.01)
    assert [opt.uses_trust_ratio(g, p) for g in opt.param_groups for p in g["params"]] == [True, False, False, True]
    opt.step()
    # plain: w − lr·g exactly (no trust ratio, no weight decay)
    assert torch.equal(bias.detach(), torch.full((4,), 1 - 0.1 * 0.5))
    assert torch.equal(forced_plain.detach(), torch.full((4, 4), 1 - 0.1 * 0.5))
    ratio = 0.01 * 4.0 / (2.0 + 0.1 * 4.0)  # ‖w‖ = 4, ‖g‖ = 2 for the 4x4 ones
    assert torch.allclose(weight.detach(), torch.full((4, 4), 1 - 0.1 * ratio * (0.5 + 0.1)), rtol=1e-6)
    ratio_1d = 0.01 * 2.0 / (1.0 + 0.1 * 2.0)
    assert torch.allclose(forced_lars.detach(), torch.full((4,), 1 - 0.1 * ratio_1d * (0.5 + 0.1)), rtol=1e-6)
    # exclude_1d=False puts biases under LARS too, per optimizer or per group
    b2 = torch.nn.Parameter(torch.ones(4))
    everything = make([b2], lr=0.1, exclude_1d=False)
    assert everything.uses_trust_ratio(everything.param_groups[0], b2)
    per_group = make([{"params": [b2], "exclude_1d": False}], lr=0.1)
    assert per_group.uses_trust_ratio(per_group.param_groups[0], b2)


STATE_KEYS = {"reference": {"momentum_buffer"},
              "chunked": {"momentum_accumulator", "accumulator_scale", "weight_share", "steps_since_rescale"},
              "fused": {"momentum_accumulator", "accumulator_scale", "weight_share", "steps_since_rescale",
                        "accumulator_scale_value"}}  # the fused path also keeps c on the host, as a float


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_state_dict_round_trip_resumes_exactly(name):
    make = IMPLEMENTATIONS[name]
    steps = gradient_stream(20)
    start = initial_weights()

    def fresh():
        params = [torch.nn.Parameter(w.clone()) for w in start]
        return params, make(params, lr=0.2, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)

    def run(params, opt, grads_list):
        for grads in grads_list:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()

    straight, opt = fresh()
    run(straight, opt, steps)
    first, opt_a = fresh()
    run(first, opt_a, steps[:10])
    saved_state = copy.deepcopy(opt_a.state_dict())
    saved_weights = [p.detach().clone() for p in first]
    resumed, opt_b = fresh()
    with torch.no_grad():
        for p, w in zip(resumed, saved_weights, strict=True):
            p.copy_(w)
    opt_b.load_state_dict(saved_state)
    run(resumed, opt_b, steps[10:])
    assert max_diff(resumed, straight) == 0.0
    assert set(saved_state["state"][0]) == STATE_KEYS[name]


@each_implementation
def test_bfloat16_parameters_step(make):
    p32 = torch.nn.Parameter(torch.randn(4, 4))
    p16 = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    for p in (p32, p16):
        p.grad = torch.randn_like(p)
    opt = make([p32, p16], lr=0.1, weight_decay=1e-4, trust_coefficient=0.5)  # large enough for bf16
    before = p16.detach().clone()
    opt.step()
    assert not torch.equal(before, p16.detach())
    assert p16.dtype == torch.bfloat16 and opt.velocity(p16).dtype == torch.bfloat16


def test_invalid_hyperparameters_name_the_culprit():
    p = [torch.nn.Parameter(torch.ones(2, 2))]
    for make in IMPLEMENTATIONS.values():
        for kwargs, word in [({"lr": -1.0}, "lr"), ({"lr": 0.1, "momentum": 1.0}, "momentum"),
                             ({"lr": 0.1, "weight_decay": -1e-4}, "weight_decay"),
                             ({"lr": 0.1, "trust_coefficient": 0.0}, "trust_coefficient"),
                             ({"lr": math.nan}, "lr")]:
            with pytest.raises(ValueError, match=word):
                make(p, **kwargs)
        with pytest.raises(ValueError, match="lars"):
            make([{"params": p, "lars": "yes"}], lr=0.1)
        with pytest.raises(ValueError, match="lr"):
            make(p)  # lr has no default unless every group carries one
        sparse = torch.nn.Parameter(torch.ones(3, 2))
        sparse.grad = torch.ones(3, 2).to_sparse()
        with pytest.raises(RuntimeError, match="sparse"):
            make([sparse], lr=0.1).step()
    for kwargs, word in [({"chunk_bytes": -1}, "chunk_bytes"), ({"fused": "yes"}, "fused"),
                         ({"fused": True, "chunk_bytes": 1 << 20}, "chunked path only")]:
        with pytest.raises(ValueError, match=word):
            FastLARS(p, lr=0.1, **kwargs)


@each_implementation
def test_groups_built_by_the_trainer_style_and_closure(make):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    opt = make([{"params": weights, "weight_decay": 1e-4, "lars": True},
                {"params": others, "weight_decay": 0.0, "lars": False}], lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(30)]
    assert losses[-1] < losses[0]


@each_implementation
def test_trust_ratio_stays_fp32_under_cpu_bf16_autocast(make):
    """A bf16 step on CPU (autocast, as ``--precision bf16``) keeps fp32 weights and gradients, and LARS's
    update stays fp32 even if taken inside autocast: within fp32 rounding of the float64 update worked out from
    the same gradients (a trust ratio from bf16 norms would be off by ~1e-3)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(4, 3, 8, 8))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    params = list(model.parameters())
    assert logits.dtype == torch.bfloat16 and all(p.dtype == p.grad.dtype == torch.float32 for p in params)
    before = [p.detach().double() for p in params]
    grads = [p.grad.double() for p in params]
    lr, eta, wd = 0.5, 0.5, 1e-3    # steps of a quarter of the weights' norm: fp32 rounding of w stays far below
    with torch.autocast("cpu", dtype=torch.bfloat16):
        make(params, lr=lr, momentum=0.9, weight_decay=wd, trust_coefficient=eta).step()
    for p, w, g in zip(params, before, grads, strict=True):
        assert p.dtype == torch.float32
        if p.ndim > 1:   # trust ratio and weight decay (1-D tensors: plain SGD)
            rate = lr * eta * w.norm() / (g.norm() + wd * w.norm())
            expected = w - rate * (g + wd * w)
        else:
            expected = w - lr * g
        step = (w - expected).abs().max()
        error = float((p.detach().double() - expected).abs().max()) / float(step)
        assert error <= 1e-5, p.shape
