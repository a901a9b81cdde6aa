"""scaling.optim_fast.FastLARS (the trainer's LARS) against scaling.optim.LARS, the readable reference.

Both paths are held to the reference and to each other: the chunked one (the CPU default) and the fused
multi-tensor one (the default on GPUs, ``fused=True`` anywhere). Tests whose name contains ``cuda`` run only where a
GPU is present (benchmarks/gpu_check.sh selects them)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scaling.optim import LARS
from scaling.optim_fast import FastLARS, rescale_interval
from tests.test_lars import SHAPES, gradient_stream, initial_weights, max_diff


class Twins:
    """A FastLARS and the reference LARS on copies of the same weights, stepped with the same gradients."""

    def __init__(self, start: list[torch.Tensor], device: str = "cpu", *, lr=0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-3, eta: float = 0.02, clip: bool = False, **fast_options) -> None:
        hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=eta, clip=clip)
        self.params = [torch.nn.Parameter(w.clone().to(device)) for w in start]
        self.fast = FastLARS(self.params, **hyper, **fast_options)
        self.weights = [torch.nn.Parameter(w.clone()) for w in start]
        self.reference = LARS(self.weights, **{**hyper, "lr": lr if isinstance(lr, float) else float(lr)})

    def step(self, grads: list[torch.Tensor | None], **group) -> None:
        self.fast.param_groups[0].update(group)
        self.reference.param_groups[0].update(
            {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in group.items()})
        for p, w, g in zip(self.params, self.weights, grads, strict=True):
            p.grad = None if g is None else g.clone().to(p.device)
            w.grad = None if g is None else g.clone()
        self.fast.step()
        self.reference.step()

    def weight_diff(self) -> float:
        return max_diff([p.cpu() for p in self.params], self.weights)

    def velocity_diff(self) -> float:
        return max_diff([self.fast.velocity(p).cpu() for p in self.params],
                        [self.reference.velocity(w) for w in self.weights])


def run_both(steps: int, lr_of, **options) -> Twins:
    twins = Twins(initial_weights(), lr=lr_of(0), **options)
    for t, grads in enumerate(gradient_stream(steps)):
        twins.step(grads, lr=lr_of(t))
    return twins


def warmup_then_poly(t: int) -> float:
    return 0.4 * (t + 1) / 5 if t < 5 else 0.4 * (1 - (t - 5) / 15) ** 2


# The chunked path with its default, one and several chunks; the fused path.
PATHS = [{}, {"chunk_bytes": 0}, {"chunk_bytes": 200}, {"fused": True}]
BOTH_PATHS = [{"fused": False}, {"fused": True}]


@pytest.mark.parametrize("path", PATHS)
def test_matches_reference_20_steps_fp64(path):
    twins = run_both(20, warmup_then_poly, **path)
    assert twins.weight_diff() < 1e-12
    assert twins.velocity_diff() < 1e-12
    # The run did something: every tensor moved, including the zero-initialised bias.
    for p, w0 in zip(twins.params, initial_weights(), strict=True):
        assert float((p.detach() - w0).abs().max()) > 1e-3


@pytest.mark.parametrize("path", [{"chunk_bytes": 300}, {"fused": True}])
def test_changing_parameter_set_tensor_lr_and_eta_match_reference(path):
    """The step plan is cached: it must follow parameters that lose or regain a gradient, a 0-dim tensor LR and
    a changed trust coefficient. A tensor without a gradient is skipped: its weights and velocity stay as they are."""
    twins = Twins(initial_weights(), momentum=0.9, weight_decay=5e-3, eta=0.02, **path)
    eta = 0.02
    for t, grads in enumerate(gradient_stream(24)):
        lr = 0.05 + 0.01 * t
        if t == 14:  # the set of tensors with gradients is the same as at step 13
            eta = 0.05
        skipped = t % len(SHAPES) if t % 3 == 0 else None
        twins.step([None if i == skipped else g for i, g in enumerate(grads)], trust_coefficient=eta,
                   lr=torch.tensor(lr, dtype=torch.float64) if t % 2 else lr)
    assert twins.weight_diff() < 1e-12
    assert twins.velocity_diff() < 1e-12


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_clip_mode_matches_reference_and_caps_the_ratio(path):
    # A large trust coefficient makes raw ratios exceed 1, so clipping changes the result.
    clipped = run_both(20, warmup_then_poly, eta=5.0, clip=True, **path)
    assert clipped.weight_diff() < 1e-12
    unclipped = run_both(20, warmup_then_poly, eta=5.0, clip=False, **path)
    assert max_diff(clipped.params, unclipped.params) > 1e-3


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_no_momentum_matches_reference(path):
    twins = run_both(20, warmup_then_poly, momentum=0.0, **path)
    assert twins.weight_diff() < 1e-12
    assert not any(twins.fast.state.values())


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_long_run_with_accumulator_rescaling_matches_reference(path):
    # momentum 0.5 renormalises the accumulator every 16 steps: 100 steps cross it six times.
    assert rescale_interval(0.5) == 16
    twins = run_both(100, lambda t: 0.3, momentum=0.5, **path)
    assert twins.weight_diff() < 1e-11
    assert twins.velocity_diff() < 1e-12
    assert all(twins.fast.state[p]["steps_since_rescale"] < 16 for p in twins.params)


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_float32_state_dict_keeps_float32_scalars(path):
    p32 = torch.nn.Parameter(torch.randn(4, 4))
    p16 = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    for p in (p32, p16):
        p.grad = torch.randn_like(p)
    opt = FastLARS([p32, p16], lr=0.1, weight_decay=1e-4, trust_coefficient=0.5, **path)
    opt.step()
    assert opt.state[p16]["accumulator_scale"].dtype == torch.float32
    other = FastLARS([p32, p16], lr=0.1, weight_decay=1e-4, **path)
    other.load_state_dict(opt.state_dict())  # casts floating state to bf16 ...
    other.step()                              # ... and the step restores float32 scalars
    assert other.state[p16]["accumulator_scale"].dtype == torch.float32


@pytest.mark.parametrize("path", BOTH_PATHS)
def test_step_makes_no_host_synchronisation(monkeypatch, path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10))
    opt = FastLARS(model.parameters(), lr=torch.tensor(0.5), momentum=0.9, weight_decay=1e-4, clip=True, **path)
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    model[0].bias.grad.zero_()
    opt.step()  # state creation happens on the first step; patch for the following ones

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside FastLARS.step()")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with pytest.raises(AssertionError):
        bool(torch.ones(()))  # the patch is live
    for _ in range(3):
        opt.step()
    # a fresh optimizer's first step (state creation) is also free of synchronisation
    FastLARS(model.parameters(), lr=0.1, weight_decay=1e-4, **path).step()
    monkeypatch.undo()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- the fused path against the chunked one


def test_default_path_is_chunked_on_cpu_and_fused_elsewhere():
    p = [torch.nn.Parameter(torch.ones(2, 2))]
    assert not FastLARS(p, lr=0.1).uses_fused_path(torch.device("cpu"))
    assert FastLARS(p, lr=0.1).uses_fused_path(torch.device("cuda"))
    assert FastLARS(p, lr=0.1, fused=True).uses_fused_path(torch.device("cpu"))
    assert not FastLARS(p, lr=0.1, fused=False).uses_fused_path(torch.device("cuda"))
    assert not FastLARS(p, lr=0.1, chunk_bytes=1 << 20).uses_fused_path(torch.device("cuda"))  # asked for chunks


def test_fused_and_chunked_paths_agree_on_a_float32_model():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    model = model.to(memory_format=torch.channels_last)
    twins = [copy.deepcopy(model) for _ in range(2)]
    opts = [FastLARS(m.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.01, fused=f)
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
    kwargs = dict(lr=0.2, momentum=0.5, weight_decay=1e-3, eta=0.02)  # crosses a renormalisation
    twins = Twins(initial_weights(), **first, **kwargs)
    for t, grads in enumerate(gradient_stream(30)):
        if t == 13:
            saved = copy.deepcopy(twins.fast.state_dict())
            twins.params = [torch.nn.Parameter(p.detach().clone()) for p in twins.params]
            twins.fast = FastLARS(twins.params, lr=0.2, momentum=0.5, weight_decay=1e-3, trust_coefficient=0.02,
                                  **then)
            twins.fast.load_state_dict(saved)
            assert twins.velocity_diff() < 1e-12   # loaded before any step
        twins.step(grads)
    assert twins.weight_diff() < 1e-12
    assert twins.velocity_diff() < 1e-12


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
    """The ops of the third step of FastLARS on ``n_copies`` copies of SHAPES (fp32, momentum, weight decay)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for _ in range(n_copies) for s in SHAPES]
    opt = FastLARS(params, lr=0.1, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02, **options)
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
    twins = Twins(initial_weights(), "cuda", lr=torch.tensor(0.3, dtype=torch.float64, device="cuda"),
                  momentum=0.9, weight_decay=5e-3, eta=0.02, **path)
    assert twins.fast.uses_fused_path(twins.params[0].device) == fused
    for grads in gradient_stream(20):
        twins.step(grads)
    assert twins.weight_diff() < 1e-12
    assert twins.velocity_diff() < 1e-12


@cuda_only
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_step_never_synchronises_with_the_host(fused):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10)).cuda().to(memory_format=torch.channels_last)
    lr = torch.tensor(0.5, device="cuda")
    opt = FastLARS(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, clip=True, fused=fused)
    model(torch.randn(4, 3, 8, 8, device="cuda")).square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")     # any synchronising CUDA call raises from here on
    try:
        for _ in range(3):
            opt.step()
        FastLARS(model.parameters(), lr=lr, weight_decay=1e-4, fused=fused).step()   # first step: plan and state
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@cuda_only
def test_cuda_fused_and_chunked_agree_on_resnet50_parameters():
    models = pytest.importorskip("models")
    torch.manual_seed(0)
    net = models.get("resnet50").cuda().to(memory_format=torch.channels_last)
    twins = [copy.deepcopy(net) for _ in range(2)]
    opts = [FastLARS(m.parameters(), lr=2.0, momentum=0.9, weight_decay=1e-4, fused=f)
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
