"""scaling.schedules: warm-up and decay end points, scaling rules, the paper's presets (values from the LARS paper,
arXiv:1708.03888, Tables 3-6)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling.schedules import (
    LRSchedule,
    PresetRangeError,
    epochs_study,
    paper_table,
    preset,
    preset_models,
    scale_lr,
)


def test_module_imports_without_torch_or_tensorflow():
    code = ("import sys; import scaling.schedules as s; s.preset('resnet50', 8192); "
            "print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@given(base=st.floats(0.01, 50), start=st.floats(0, 5), end=st.floats(0, 1e-2), total=st.integers(2, 5000),
       warmup_fraction=st.floats(0, 0.9), kind=st.sampled_from(["poly", "cosine"]), power=st.floats(0.5, 4))
@settings(max_examples=300, deadline=None)
def test_warmup_end_hits_base_lr_and_last_step_hits_end_lr_exactly(base, start, end, total, warmup_fraction, kind,
                                                                    power):
    warmup = min(total - 2, int(warmup_fraction * total))
    s = LRSchedule(base_lr=base, total_steps=total, warmup_steps=warmup, warmup_start_lr=start, end_lr=end,
                   kind=kind, power=power)
    assert s.lr_at(warmup) == base          # exactly, not approximately
    assert s.lr_at(total - 1) == end
    assert s.lr_at(total + 10) == end        # past the end: the last step's rate
    assert s.lr_at(0) == (start if warmup > 0 else base)
    lrs = s.lrs()
    decay = lrs[warmup:]
    assert all(a >= b - 1e-12 * base for a, b in zip(decay, decay[1:], strict=False))  # monotone (to rounding)


def test_linear_warmup_and_poly_power_two_values():
    s = LRSchedule(base_lr=10.0, total_steps=21, warmup_steps=5, warmup_start_lr=1.0, end_lr=0.0)
    assert [s.lr_at(t) for t in range(6)] == pytest.approx([1.0, 2.8, 4.6, 6.4, 8.2, 10.0], abs=1e-12)
    # decay over steps 5..20: p = (t-5)/15, lr = 10·(1-p)^2
    assert s.lr_at(8) == pytest.approx(10 * (1 - 3 / 15) ** 2, abs=1e-12)
    assert s.lr_at(20) == 0.0
    assert s(8) == s.lr_at(8)


def test_cosine_and_step_kinds():
    c = LRSchedule(base_lr=2.0, total_steps=11, kind="cosine", end_lr=0.5)
    assert c.lr_at(5) == pytest.approx(0.5 + 1.5 * 0.5, abs=1e-12)
    s = LRSchedule(base_lr=1.0, total_steps=90, kind="step")
    assert s.step_milestones == (30, 60, 80)
    assert [s.lr_at(t) for t in (0, 29, 30, 59, 60, 80, 89)] == pytest.approx([1, 1, .1, .1, .01, .001, .001])
    custom = LRSchedule(base_lr=1.0, total_steps=10, warmup_steps=2, kind="step", milestones=(4,), gamma=0.5)
    assert [custom.lr_at(t) for t in range(6)] == pytest.approx([0, 0.5, 1, 1, 0.5, 0.5])


def test_warmup_over_every_step_has_no_decay_phase():
    s = LRSchedule(base_lr=4.0, total_steps=5, warmup_steps=5)
    assert s.lrs() == pytest.approx([0, 0.8, 1.6, 2.4, 3.2])
    one = LRSchedule(base_lr=4.0, total_steps=1)
    assert one.lrs() == [4.0]


def test_from_epochs_rounds_steps():
    s = LRSchedule.from_epochs(3.0, epochs=2.5, steps_per_epoch=10, warmup_epochs=0.54)
    assert (s.total_steps, s.warmup_steps) == (25, 5)


@pytest.mark.parametrize("kwargs, word", [
    ({"base_lr": -1, "total_steps": 10}, "base_lr"), ({"base_lr": 1, "total_steps": 0}, "total_steps"),
    ({"base_lr": 1, "total_steps": 10, "warmup_steps": 11}, "warmup_steps"),
    ({"base_lr": 1, "total_steps": 10, "kind": "linear"}, "kind"),
    ({"base_lr": 1, "total_steps": 10, "power": 0}, "power"),
    ({"base_lr": 1, "total_steps": 10, "milestones": (5, 2)}, "milestones"),
    ({"base_lr": 1, "total_steps": 2.5}, "total_steps"), ({"base_lr": math.nan, "total_steps": 3}, "base_lr"),
])
def test_invalid_schedules_name_the_culprit(kwargs, word):
    with pytest.raises(ValueError, match=word):
        LRSchedule(**kwargs)
    with pytest.raises(ValueError, match="step"):
        LRSchedule(1.0, 10).lr_at(-1)


def test_scaling_rules():
    assert scale_lr(0.1, 8192) == pytest.approx(3.2)
    assert scale_lr(0.1, 8192, rule="sqrt") == pytest.approx(0.1 * math.sqrt(32))
    assert scale_lr(0.1, 8192, rule="none") == 0.1
    assert scale_lr(2.0, 512, reference_batch=1024) == 1.0
    with pytest.raises(ValueError, match="rule"):
        scale_lr(0.1, 512, rule="log")
    with pytest.raises(ValueError, match="global_batch"):
        scale_lr(0.1, 0)


# The paper's tables as read (presets.yaml quotes the garbled cells).
# (batch, LR, warm-up epochs or None, epochs or None, top-1)
ALEXNET = [(512, 2, 58.7), (4096, 10, 58.5), (8192, 10, 58.2), (16384, 14, 55.0)]
ALEXNET_BN = [(512, 2, 60.2), (4096, 10, 60.4), (8192, 14, 60.1), (16384, 23, 59.3), (32768, 22, 57.8)]
RESNET50 = [(256, 1, 0, 73.8, 75.8), (1024, 2, 5, 73.3, 75.4), (8192, 30, 5, 73.5, 75.2), (16384, 33, 12, 72.9, 74.4),
            (32768, 40, 12, 72.5, 72.5)]
GOOGLENET = [(256, 4, 100, 5, 70.3), (1024, 6, 100, 10, 69.7), (2048, 7, 150, 25, None), (4096, 10, 200, 30, 69.9),
             (8192, 10, 250, 60, 69.0), (16384, 10, 350, 110, 67.2)]


def test_presets_reproduce_the_paper_tables():
    for model, rows in (("alexnet", ALEXNET), ("alexnet_bn", ALEXNET_BN)):
        for batch, lr, top1 in rows:
            p = preset(model, batch)
            assert (p.base_lr, p.top1, p.epochs, p.rule, p.extrapolated) == (lr, top1, 100, "table", False)
            assert (p.weight_decay, p.trust_coefficient, p.momentum, p.power) == (5e-4, 1e-3, 0.9, 2.0)
    for batch, lr, warmup, top1, top1_ext in RESNET50:
        p = preset("resnet50", batch)
        assert (p.base_lr, p.warmup_epochs, p.top1, p.top1_extended_aug) == (lr, warmup, top1, top1_ext)
        assert (p.weight_decay, p.end_lr, p.uncertain) == (1e-4, 1e-4, batch <= 1024)  # the "?" readings
    for batch, lr, epochs, warmup, top1 in GOOGLENET:
        p = preset("googlenet", batch)
        assert (p.base_lr, p.epochs, p.warmup_epochs, p.top1) == (lr, epochs, warmup, top1)
    assert preset("resnet50_v1", 8192) == preset("resnet50", 8192) == preset("ResNet-50", 8192)
    assert preset_models() == ["alexnet", "alexnet_bn", "googlenet", "resnet50"]
    assert paper_table("alexnet")[-1]["base_lr"] is None and paper_table("alexnet")[-1]["top1"] == 46.9
    assert epochs_study("resnet50") == {"batch": 16384, "top1_by_epochs": {100: 74.4, 125: 74.1, 150: 74.6,
                                                                           175: 74.8, 200: 75.5}}
    assert epochs_study("alexnet_bn")["top1_by_epochs"][200] == 59.9


def test_between_rows_is_log_linear_interpolation():
    p = preset("alexnet_bn", 2048)  # log2: 9 → 12, 11 is 2/3 of the way from 512 (LR 2) to 4K (LR 10)
    assert p.base_lr == pytest.approx(2 + 8 * 2 / 3)
    assert (p.rule, p.rows, p.top1, p.extrapolated) == ("interpolated", (512, 4096), None, False)
    r = preset("resnet50", 11585)  # ≈ 2**13.5: halfway between 8K and 16K in log2
    assert r.base_lr == pytest.approx(31.5, abs=2e-3) and r.warmup_epochs == pytest.approx(8.5, abs=2e-3)
    g = preset("googlenet", 3072)  # between 2K and 4K: epochs and warm-up interpolate too
    x = math.log2(3072 / 2048)
    assert (g.base_lr, g.epochs, g.warmup_epochs) == pytest.approx((7 + 3 * x, 150 + 50 * x, 25 + 5 * x))
    assert preset("resnet50", 512).uncertain and not preset("resnet50", 12000).uncertain


def test_outside_the_table_is_an_error_or_an_explicit_extrapolation():
    for model, batch in (("resnet50", 65536), ("resnet50", 128), ("alexnet", 32768), ("googlenet", 100)):
        with pytest.raises(PresetRangeError, match=str(batch)):
            preset(model, batch)
    above = preset("resnet50", 65536, extrapolate=True)
    assert (above.base_lr, above.warmup_epochs, above.extrapolated, above.rule) == (40, 12, True, "extrapolated")
    assert above.top1 is None and "extrapolated" in above.notes[-1] and above.global_batch == 65536
    below = preset("alexnet_bn", 128, extrapolate=True)
    assert below.base_lr == pytest.approx(2 * 128 / 512) and below.extrapolated
    alex32k = preset("alexnet", 32768, extrapolate=True)  # the illegible 32K LR is never guessed silently
    assert (alex32k.base_lr, alex32k.rows, alex32k.extrapolated) == (14, (16384,), True)
    inside = preset("resnet50", 8192, extrapolate=True)
    assert not inside.extrapolated


def test_mlperf_bands_and_bad_names():
    assert [preset("resnet50", b, table="mlperf").base_lr for b in (256, 16383, 16384, 32767, 32768, 10**6)] == \
        [10, 10, 25, 25, 31.2, 31.2]
    assert preset("resnet50", 40000, table="mlperf").warmup_epochs == 25
    with pytest.raises(ValueError, match="vgg16"):
        preset("vgg16", 1024)
    with pytest.raises(ValueError, match="mlperf"):
        preset("alexnet", 1024, table="mlperf")
    with pytest.raises(ValueError, match="table"):
        preset("alexnet", 1024, table="imaginary")
    with pytest.raises(ValueError, match="global_batch"):
        preset("alexnet", 0)


def test_preset_schedule():
    p = preset("resnet50", 8192)
    s = p.schedule(steps_per_epoch=156)
    assert (s.total_steps, s.warmup_steps, s.base_lr, s.end_lr) == (15600, 780, 30.0, 1e-4)
    assert s.lr_at(780) == 30.0 and s.lr_at(15599) == 1e-4
