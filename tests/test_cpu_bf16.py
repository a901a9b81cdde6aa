"""bf16 on CPUs (issue 27): the catalog and the CPU profiles give a bf16 peak only where the cores have bf16
instructions (AVX512-BF16, AMX); `predict` and `plan` use it at --precision bf16 and refuse bf16 elsewhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

from analysis.calibrate import calibrated_profile, fit_runs_compute
from analysis.devices import devices
from analysis.fitting import CalibrationError
from analysis.params import PerfParams
from analysis.plan import plan
from analysis.predict import predict_point
from analysis.runs import RunMeasurement
from larscale.machine import bundled_machines, load_machine, parse_machine
from tests.conftest import REPO

CPU_PROFILES = [name for name in bundled_machines() if load_machine(name).node.devices.kind == "cpu"]


def test_every_cpu_profile_is_checked() -> None:
    assert {"local", "stampede3", "stampede3-skx", "perlmutter-cpu", "stampede2-knl", "stampede2-skx"} \
        <= set(CPU_PROFILES)


@pytest.mark.parametrize("name", CPU_PROFILES)
def test_bf16_uses_the_peak_or_is_refused(name: str) -> None:
    machine = load_machine(name)
    peaks = machine.node.devices.peak_tflops
    fp32 = predict_point("resnet50", machine, 1, 64, 1)
    if "bf16" in peaks:
        assert peaks["bf16"] >= peaks["fp32"]
        assert PerfParams.from_machine(machine, "bf16").peak_flops_per_device == pytest.approx(peaks["bf16"] * 1e12)
        bf16 = predict_point("resnet50", machine, 1, 64, 1, precision="bf16")
        assert fp32["compute_s"] > bf16["compute_s"] > fp32["compute_s"] * peaks["fp32"] / peaks["bf16"]
    else:
        with pytest.raises(ValueError, match=rf"--precision bf16: machine '{name}' .* no bf16 peak"):
            predict_point("resnet50", machine, 1, 64, 1, precision="bf16")
    with pytest.raises(ValueError, match="fp16 on GPUs only"):
        PerfParams.from_machine(machine, "fp16")


def test_catalog_cpus_with_bf16_instructions() -> None:
    catalog = devices()
    assert catalog["xeon-8480"].peak_tflops["bf16"] > 10 * catalog["xeon-8480"].peak_tflops["fp32"]   # AMX
    assert catalog["epyc-9654"].peak_tflops["bf16"] == pytest.approx(2 * catalog["epyc-9654"].peak_tflops["fp32"],
                                                                     rel=0.01)                        # AVX512-BF16
    assert "bf16" not in catalog["xeon-8160"].peak_tflops and "bf16" not in catalog["epyc-7763"].peak_tflops


def test_plan_at_bf16() -> None:
    machine = load_machine("stampede3")
    fp32 = plan("resnet50", machine, epochs=90, batches=[4096])
    bf16 = plan("resnet50", machine, epochs=90, batches=[4096], params=PerfParams.from_machine(machine, "bf16"))
    assert min(r.wall_s for r in bf16.rows) < min(r.wall_s for r in fp32.rows)


def test_cli_refuses_bf16_on_a_cpu_without_it() -> None:
    for command in (["predict", "--nodes", "1", "--global-batch", "256"], ["plan", "--epochs", "90"]):
        proc = subprocess.run([sys.executable, "-m", "larscale", *command, "--model", "resnet50", "--machine",
                               "perlmutter-cpu", "--precision", "bf16"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"larscale {command[0]}: error: --precision bf16: "
                                                               "machine 'perlmutter-cpu'"), proc.stderr


def test_measured_rates_hold_for_their_precision_only() -> None:
    doc = load_machine("local").to_dict()
    doc["compute"].update(measured_images_per_s={"resnet50": {4: 10.0, 8: 11.0}}, measured_precision="fp32")
    machine = parse_machine(doc)
    fp32 = predict_point("resnet50", machine, 1, 8, 1, ranks_per_node=1)
    bf16 = predict_point("resnet50", machine, 1, 8, 1, ranks_per_node=1, precision="bf16")
    assert fp32["images_per_s"] == pytest.approx(11.0, rel=0.02)          # the measured rate
    assert bf16["images_per_s"] != pytest.approx(fp32["images_per_s"], rel=0.05)   # the model at the bf16 peak
    doc["compute"].pop("measured_precision")                               # unset: for any precision
    assert predict_point("resnet50", parse_machine(doc), 1, 8, 1, ranks_per_node=1, precision="bf16")[
        "images_per_s"] == pytest.approx(11.0, rel=0.02)


def test_calibration_takes_one_precision() -> None:
    def run(precision: str, batch: int) -> RunMeasurement:
        step = batch / 10.0
        return RunMeasurement(path=f"{precision}-{batch}", model="resnet50", image_size=None, ranks=1,
                              batch_per_rank=batch, threads_per_rank=1, steps_measured=5, step_s=step,
                              step_s_mean=step, busy_s=step, allreduce_s=0.0, compute_s=step, optimizer_s=0.0,
                              data_s=0.0, precision=precision)

    base = load_machine("local")
    fit = fit_runs_compute(base, [run("fp32", 4), run("fp32", 8)], runs_apart=True)
    assert fit.precision == "fp32"
    assert calibrated_profile(base, compute=fit)["compute"]["measured_precision"] == "fp32"
    with pytest.raises(CalibrationError, match="fp32 and bf16|bf16 and fp32"):
        fit_runs_compute(base, [run("fp32", 4), run("bf16", 8)], runs_apart=True)
