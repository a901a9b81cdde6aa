"""scaling.optim.LARS against a plain per-tensor reference, its options, its state, and no host synchronisation.

Both update paths are tested the same way: the chunked one (the CPU default) and the fused multi-tensor one (the
default on GPUs, ``fused=True`` anywhere), against ``reference_lars`` and against each other. Tests whose name
contains ``cuda`` run only where a GPU is present (benchmarks/gpu_check.sh selects them with ``-k cuda``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scaling.optim import LARS, rescale_interval

SHAPES = [(6, 3, 3, 3), (6,), (12, 24), (12,), (5, 12), (5,), (7,)]


def reference_lars(weights: list[torch.Tensor], grads: list[torch.Tensor], velocities: list[torch.Tensor], lr: float,
                   momentum: float, weight_decay: float, eta: float, lars_mask: list[bool],
                   clip: bool = False) -> None:
    """The LARS update written the obvious way, one tensor at a time, with the velocity stored as is."""
    for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
        if lars_mask[i]:
            w_norm, g_norm = float(w.norm()), float(g.norm())
            local_lr = eta * w_norm / (g_norm + weight_decay * w_norm) if w_norm > 0 and g_norm > 0 else 1.0
            if clip:
                local_lr = min(local_lr, 1.0)
            velocities[i] = momentum * velocities[i] + lr * local_lr * (g + weight_decay * w)
        else:
            velocities[i] = momentum * velocities[i] + lr * g
        weights[i] = w - velocities[i]


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


def run_both(steps: int, lr_of, momentum: float = 0.9, weight_decay: float = 5e-3, eta: float = 0.02,
             clip: bool = False, **lars_kwargs):
    start = initial_weights()
    params = [torch.nn.Parameter(w.clone()) for w in start]
    opt = LARS(params, lr=lr_of(0), momentum=momentum, weight_decay=weight_decay, trust_coefficient=eta, clip=clip,
               **lars_kwargs)
    weights = [w.clone() for w in start]
    velocities = [torch.zeros_like(w) for w in start]
    mask = [w.ndim > 1 for w in start]
    for t, grads in enumerate(gradient_stream(steps)):
        for group in opt.param_groups:
            group["lr"] = lr_of(t)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        reference_lars(weights, grads, velocities, lr_of(t), momentum, weight_decay, eta, mask, clip)
    return opt, params, weights, velocities, start


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b, strict=True))


def warmup_then_poly(t: int) -> float:
    return 0.4 * (t + 1) / 5 if t < 5 else 0.4 * (1 - (t - 5) / 15) ** 2


# The chunked path with its default, one and several chunks; the fused path.
PATHS = [{}, {"chunk_bytes": 0}, {"chunk_bytes": 200}, {"fused": True}]
BOTH_PATHS = [{"fused": False}, {"fused": True}]


@pytest.mark.parametrize("path", PATHS)
def test_matches_reference_20_steps_fp64(path):
    opt, params, weights, velocities, start = run_both(20, warmup_then_poly, **path)
    assert max_diff(params, weights) < 1e-12
    assert max_diff([opt.velocity(p) for p in params], velocities) < 1e-12
    # The run did something: every tensor moved, including the zero-initialised bias.
    for p, w0 in zip(params, start, strict=True):
        assert float((p.detach() - w0).abs().max()) > 1e-3


@pytest.mark.parametrize("path", [{"chunk_bytes": 300}, {"fused": True}])
def test_changing_parameter_set_tensor_lr_and_eta_match_reference(path):
    """The step plan is cached: it must follow parameters that lose or regain a gradient, a 0-dim tensor LR and
    a changed trust coefficient. A tensor without a gradient is skipped: its weights and velocity stay as they are."""
    start = initial_weights()
    params = [torch.nn.Parameter(w.clone()) for w in start]
    opt = LARS(params, lr=0.1, momentum=0.9, weight_decay=5e-3, trust_coefficient=0.02, **path)
    weights = [w.clone() for w in start]
    velocities = [torch.zeros_like(w) for w in start]
    mask = [w.ndim > 1 for w in start]
    eta = 0.02
    for t, grads in enumerate(gradient_stream(24)):
        lr = 0.05 + 0.01 * t
        if t == 14:  # the set of tensors with gradients is the same as at step 13
            eta = 0.05
        skipped = {t % len(SHAPES)} if t % 3 == 0 else set()
        opt.param_groups[0]["lr"] = torch.tensor(lr, dtype=torch.float64) if t % 2 else lr
        opt.param_groups[0]["trust_coefficient"] = eta
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            p.grad = None if i in skipped else g.clone()
        opt.step()
        kept = [i for i in range(len(SHAPES)) if i not in skipped]
        sub_w, sub_v = [weights[i] for i in kept], [velocities[i] for i in kept]
        reference_lars(sub_w, [grads[i] for i in kept], sub_v, lr, 0.9, 5e-3, eta, [mask[i] for i in kept])
        for j, i in enumerate(kept):
            weights[i], velocities[i] = sub_w[j], sub_v[j]
    assert max_diff(params, weights) < 1e-12
    assert max_diff([opt.velocity(p) for p in params], velocities) < 1e-12


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_clip_mode_matches_reference_and_caps_the_ratio(path):
    # A large trust coefficient makes raw ratios exceed 1, so clipping changes the result.
    opt, params, weights, _, _ = run_both(20, warmup_then_poly, eta=5.0, clip=True, **path)
    assert max_diff(params, weights) < 1e-12
    _, unclipped, _, _, _ = run_both(20, warmup_then_poly, eta=5.0, clip=False, **path)
    assert max_diff(params, unclipped) > 1e-3


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_no_momentum_matches_reference(path):
    opt, params, weights, _, _ = run_both(20, warmup_then_poly, momentum=0.0, **path)
    assert max_diff(params, weights) < 1e-12
    assert not any(opt.state.values())   # no velocity to keep: no model-sized accumulator either


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_long_run_with_accumulator_rescaling_matches_reference(path):
    # momentum 0.5 renormalises the accumulator every 16 steps: 100 steps cross it six times.
    assert rescale_interval(0.5) == 16
    opt, params, weights, velocities, _ = run_both(100, lambda t: 0.3, momentum=0.5, **path)
    assert max_diff(params, weights) < 1e-11
    assert max_diff([opt.velocity(p) for p in params], velocities) < 1e-12
    assert all(opt.state[p]["steps_since_rescale"] < 16 for p in params)


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_trust_ratio_uses_raw_gradient_norm_and_per_tensor_norms(path):
    """One step from zero velocity: v = lr·η‖w‖/(‖g‖+β‖w‖)·(g + βw) per tensor (REFERENCE's bug list)."""
    f64 = dict(dtype=torch.float64)
    w0, w_grad = torch.tensor([[3.0, 4.0]], **f64), torch.tensor([[0.0, 2.0]], **f64)      # ‖w‖ = 5, ‖g‖ = 2
    u0, u_grad = torch.tensor([[0.0, 100.0]], **f64), torch.tensor([[1.0, 0.0]], **f64)    # ‖u‖ = 100, ‖g‖ = 1
    w, u = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(u0.clone())
    w.grad, u.grad = w_grad.clone(), u_grad.clone()
    lr, eta, wd = 0.5, 0.1, 0.01
    LARS([w, u], lr=lr, momentum=0.9, weight_decay=wd, trust_coefficient=eta, **path).step()
    # per-tensor norms of the raw gradient: not ‖g + βw‖ (weight decay counted twice), not a global norm
    ratio_w = eta * 5 / (2 + wd * 5)
    ratio_u = eta * 100 / (1 + wd * 100)
    assert torch.allclose(w.detach(), w0 - lr * ratio_w * (w_grad + wd * w0), rtol=0, atol=1e-14)
    assert torch.allclose(u.detach(), u0 - lr * ratio_u * (u_grad + wd * u0), rtol=0, atol=1e-14)
    # and the update is applied in place (the add-vs-add_ bug would leave the weights unchanged)
    assert not torch.equal(w.detach(), w0)


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_zero_weight_and_zero_gradient_use_ratio_one(path):
    zero_w = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    zero_g = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float64))
    zero_w.grad = torch.full((3, 2), 2.0, dtype=torch.float64)
    zero_g.grad = torch.zeros(3, 2, dtype=torch.float64)
    LARS([zero_w, zero_g], lr=0.1, momentum=0.9, weight_decay=0.5, trust_coefficient=1e-3, **path).step()
    assert torch.allclose(zero_w.detach(), torch.full((3, 2), -0.2, dtype=torch.float64), rtol=0, atol=1e-15)
    # zero gradient: ratio 1, the update is the weight decay alone: w − lr·β·w
    assert torch.allclose(zero_g.detach(), torch.full((3, 2), 1 - 0.1 * 0.5, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_excluded_parameters_get_plain_momentum_sgd_without_weight_decay(path):
    weight = torch.nn.Parameter(torch.ones(4, 4))
    bias = torch.nn.Parameter(torch.ones(4))
    forced_plain = torch.nn.Parameter(torch.ones(4, 4))
    forced_lars = torch.nn.Parameter(torch.ones(4))
    for p in (weight, bias, forced_plain, forced_lars):
        p.grad = torch.full_like(p, 0.5)
    opt = LARS([{"params": [weight, bias]}, {"params": [forced_plain], "lars": False},
                {"params": [forced_lars], "lars": True}], lr=0.1, weight_decay=0.1, trust_coefficient=0.01, **path)
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
    everything = LARS([b2], lr=0.1, exclude_1d=False)
    assert everything.uses_trust_ratio(everything.param_groups[0], b2)
    per_group = LARS([{"params": [b2], "exclude_1d": False}], lr=0.1)
    assert per_group.uses_trust_ratio(per_group.param_groups[0], b2)


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_state_dict_round_trip_resumes_exactly(path):
    steps = gradient_stream(20)
    start = initial_weights()

    def fresh():
        params = [torch.nn.Parameter(w.clone()) for w in start]
        return params, LARS(params, lr=0.2, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, **path)

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
    keys = {"momentum_accumulator", "accumulator_scale", "weight_share", "steps_since_rescale"}
    if path["fused"]:
        keys.add("accumulator_scale_value")  # c on the host, as a float
    assert set(saved_state["state"][0]) == keys


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_float32_state_dict_keeps_float32_scalars_and_bfloat16_params_step(path):
    p32 = torch.nn.Parameter(torch.randn(4, 4))
    p16 = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    for p in (p32, p16):
        p.grad = torch.randn_like(p)
    opt = LARS([p32, p16], lr=0.1, weight_decay=1e-4, trust_coefficient=0.5, **path)  # large enough for bf16
    before = p16.detach().clone()
    opt.step()
    assert not torch.equal(before, p16.detach())
    assert opt.state[p16]["accumulator_scale"].dtype == torch.float32
    other = LARS([p32, p16], lr=0.1, weight_decay=1e-4, **path)
    other.load_state_dict(opt.state_dict())  # casts floating state to bf16 ...
    other.step()                              # ... and the step restores float32 scalars
    assert other.state[p16]["accumulator_scale"].dtype == torch.float32


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_step_makes_no_host_synchronisation(monkeypatch, path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10))
    opt = LARS(model.parameters(), lr=torch.tensor(0.5), momentum=0.9, weight_decay=1e-4, clip=True, **path)
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    model[0].bias.grad.zero_()
    opt.step()  # state creation happens on the first step; patch for the following ones

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside LARS.step()")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with pytest.raises(AssertionError):
        bool(torch.ones(()))  # the patch is live
    for _ in range(3):
        opt.step()
    # a fresh optimizer's first step (state creation) is also free of synchronisation
    LARS(model.parameters(), lr=0.1, weight_decay=1e-4, **path).step()
    monkeypatch.undo()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_invalid_hyperparameters_name_the_culprit():
    p = [torch.nn.Parameter(torch.ones(2, 2))]
    for kwargs, word in [({"lr": -1.0}, "lr"), ({"lr": 0.1, "momentum": 1.0}, "momentum"),
                         ({"lr": 0.1, "weight_decay": -1e-4}, "weight_decay"),
                         ({"lr": 0.1, "trust_coefficient": 0.0}, "trust_coefficient"),
                         ({"lr": 0.1, "chunk_bytes": -1}, "chunk_bytes"), ({"lr": math.nan}, "lr"),
                         ({"lr": 0.1, "fused": "yes"}, "fused"),
                         ({"lr": 0.1, "fused": True, "chunk_bytes": 1 << 20}, "chunked path only")]:
        with pytest.raises(ValueError, match=word):
            LARS(p, **kwargs)
    with pytest.raises(ValueError, match="lars"):
        LARS([{"params": p, "lars": "yes"}], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        LARS(p)  # lr has no default unless every group carries one
    sparse = torch.nn.Parameter(torch.ones(3, 2))
    sparse.grad = torch.ones(3, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        LARS([sparse], lr=0.1).step()


def test_groups_built_by_the_trainer_style_and_closure():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    opt = LARS([{"params": weights, "weight_decay": 1e-4, "lars": True},
                {"params": others, "weight_decay": 0.0, "lars": False}], lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(30)]
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- the fused path against the chunked one


def test_default_path_is_chunked_on_cpu_and_fused_elsewhere():
    p = [torch.nn.Parameter(torch.ones(2, 2))]
    assert not LARS(p, lr=0.1).uses_fused_path(torch.device("cpu"))
    assert LARS(p, lr=0.1).uses_fused_path(torch.device("cuda"))
    assert LARS(p, lr=0.1, fused=True).uses_fused_path(torch.device("cpu"))
    assert not LARS(p, lr=0.1, fused=False).uses_fused_path(torch.device("cuda"))
    assert not LARS(p, lr=0.1, chunk_bytes=1 << 20).uses_fused_path(torch.device("cuda"))  # asked for chunks


def test_fused_and_chunked_paths_agree_on_a_float32_model():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    model = model.to(memory_format=torch.channels_last)
    twins = [copy.deepcopy(model) for _ in range(2)]
    opts = [LARS(m.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.01, fused=f)
            for m, f in zip(twins, (False, True), strict=True)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        x, y = torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)
        for m, opt in zip(twins, opts, strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    scale = max(float(p.detach().abs().max()) for p in twins[0].parameters())
    assert max_diff(list(twins[0].parameters()), list(twins[1].parameters())) < 1e-5 * scale
    assert max_diff(list(twins[0].parameters()), list(model.parameters())) > 1e-3   # they did train


@pytest.mark.parametrize("first, then", [({"fused": False}, {"fused": True}), ({"fused": True}, {"fused": False})])
def test_state_dict_resumes_across_the_two_paths(first, then):
    """A checkpoint written by one path continues on the other, on the reference trajectory."""
    steps = gradient_stream(30)
    start = initial_weights()
    params = [torch.nn.Parameter(w.clone()) for w in start]
    kwargs = dict(lr=0.2, momentum=0.5, weight_decay=1e-3, trust_coefficient=0.02)  # crosses a renormalisation
    opt = LARS(params, **first, **kwargs)
    weights, velocities = [w.clone() for w in start], [torch.zeros_like(w) for w in start]
    mask = [w.ndim > 1 for w in start]
    for t, grads in enumerate(steps):
        if t == 13:
            saved = copy.deepcopy(opt.state_dict())
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = LARS(params, **then, **kwargs)
            opt.load_state_dict(saved)
            assert max_diff([opt.velocity(p) for p in params], velocities) < 1e-12   # loaded before any step
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        reference_lars(weights, grads, velocities, 0.2, 0.5, 1e-3, 0.02, mask)
    assert max_diff(params, weights) < 1e-12
    assert max_diff([opt.velocity(p) for p in params], velocities) < 1e-12


class RecordOps(TorchDispatchMode):
    """Every ATen op a block of code runs, with its arguments (as the dispatcher sees them)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func.overloadpacket), args))
        return func(*args, **(kwargs or {}))


def foreach_lists_have_equal_layouts(calls) -> bool:
    """Whether every foreach op got tensor lists whose i-th tensors share shape, strides and dtype: what the CUDA
    multi-tensor kernels require (otherwise they fall back to one kernel per tensor)."""
    for name, args in calls:
        if "_foreach_" not in name:
            continue
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        for column in zip(*lists, strict=True):
            if len({(t.shape, t.stride(), t.dtype) for t in column}) != 1:
                return False
    return True


def step_calls(n_copies: int, **options) -> list[tuple[str, tuple]]:
    """The ops of the third step of LARS on ``n_copies`` copies of SHAPES (fp32, momentum, weight decay)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for _ in range(n_copies) for s in SHAPES]
    opt = LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02, **options)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if _ < 2:
            opt.step()
    with RecordOps() as recorder:
        opt.step()
    return recorder.calls


def test_fused_step_is_a_fixed_number_of_multi_tensor_ops():
    few, many = step_calls(1, fused=True), step_calls(6, fused=True)
    assert [name for name, _ in few] == [name for name, _ in many]     # no op per tensor or per chunk
    assert foreach_lists_have_equal_layouts(many)
    assert not any("local_scalar_dense" in name for name, _ in many)   # no .item() (host read) either
    # the chunked path passes per-tensor 0-dim multipliers: the layouts differ (the check can fail)
    assert not foreach_lists_have_equal_layouts(step_calls(6, fused=False))


# ---------------------------------------------------------------- on a GPU (skipped elsewhere)

def cuda_only(test):  # noqa: ANN001, ANN201 - a test decorator
    """Marked ``gpu`` (benchmarks/gpu_check.sh selects them) and skipped where no CUDA device is visible."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@cuda_only
@pytest.mark.parametrize("path, fused", [({}, True), ({"fused": True}, True), ({"fused": False}, False),
                                         ({"chunk_bytes": 200}, False)])
def test_cuda_matches_reference_fp64(path, fused):
    start = initial_weights()
    params = [torch.nn.Parameter(w.clone().cuda()) for w in start]
    opt = LARS(params, lr=torch.tensor(0.3, dtype=torch.float64, device="cuda"), momentum=0.9, weight_decay=5e-3,
               trust_coefficient=0.02, **path)
    assert opt.uses_fused_path(params[0].device) == fused
    weights, velocities = [w.clone() for w in start], [torch.zeros_like(w) for w in start]
    for grads in gradient_stream(20):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.cuda()
        opt.step()
        reference_lars(weights, grads, velocities, 0.3, 0.9, 5e-3, 0.02, [w.ndim > 1 for w in start])
    assert max_diff([p.cpu() for p in params], weights) < 1e-12
    assert max_diff([opt.velocity(p).cpu() for p in params], velocities) < 1e-12


@cuda_only
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_step_never_synchronises_with_the_host(fused):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10)).cuda().to(memory_format=torch.channels_last)
    lr = torch.tensor(0.5, device="cuda")
    opt = LARS(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, clip=True, fused=fused)
    model(torch.randn(4, 3, 8, 8, device="cuda")).square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")     # any synchronising CUDA call raises from here on
    try:
        for _ in range(3):
            opt.step()
        LARS(model.parameters(), lr=lr, weight_decay=1e-4, fused=fused).step()   # first step: plan and state
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@cuda_only
def test_cuda_fused_and_chunked_agree_on_resnet50_parameters():
    models = pytest.importorskip("models")
    torch.manual_seed(0)
    net = models.get("resnet50").cuda().to(memory_format=torch.channels_last)
    twins = [copy.deepcopy(net) for _ in range(2)]
    opts = [LARS(m.parameters(), lr=2.0, momentum=0.9, weight_decay=1e-4, fused=f)
            for m, f in zip(twins, (False, True), strict=True)]
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, device="cuda", generator=gen) * 1e-3 for p in net.parameters()]
        for m, opt in zip(twins, opts, strict=True):
            for p, g in zip(m.parameters(), grads, strict=True):
                p.grad = g.clone(memory_format=torch.preserve_format).contiguous(
                    memory_format=torch.channels_last if p.ndim == 4 else torch.contiguous_format)
            opt.step()
    scale = max(float(p.detach().abs().max()) for p in twins[0].parameters())
    assert max_diff(list(twins[0].parameters()), list(twins[1].parameters())) < 1e-5 * scale
    assert max_diff(list(twins[0].parameters()), list(net.parameters())) > 0   # they moved
