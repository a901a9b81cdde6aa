"""The trainer's behaviour pinned: a deterministic 2-rank run per framework reproduces saved results exactly.

Saved under tests/golden/train/<framework>/ by the trainer as it was before the lifecycle was split into
scaling/loop.py and its adapters (commit "test_train_pinned: ..."): every rank's step log less its timings, the
summary less timings, hosts, paths and versions, and the checkpoint tensors at steps 3 and 6 (weights, optimizer
state, RNG streams). A refactoring of the trainer must leave all of them bitwise identical on the machine that
made them (same CPU instruction set: oneDNN and Eigen pick their kernels, and so their rounding, by it);
elsewhere they must agree to fp32 rounding.

Regenerate only on purpose (a change of the math), with ``LARSCALE_REGENERATE_GOLDEN=1``.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from larscale.runformat import read_steps, step_log_path
from scaling import checkpoint as ckpt
from tests.conftest import REPO, run_ranks

GOLDEN = REPO / "tests" / "golden" / "train"
REGENERATE = os.environ.get("LARSCALE_REGENERATE_GOLDEN") == "1"
ARGS = ["--model", "tiny", "--dataset", "digits", "--image-size", "16", "--batch-per-rank", "4",
        "--accumulation", "2", "--steps", "6", "--optimizer", "lars", "--lr", "0.3", "--warmup-steps", "2",
        "--end-lr", "0.05", "--weight-decay", "1e-3", "--deterministic", "--threads", "1",
        "--checkpoint-every", "3", "--keep", "5"]
CONTROLLER = {"torch": "mpi", "tensorflow": "gloo"}
STEP_KEYS = ("step", "epoch", "rank", "ranks", "batch_per_rank", "global_batch", "lr", "loss")
# Summary entries that depend on timing, the host, the run directory or the installed versions.
VOLATILE_SUMMARY = ("throughput", "times", "totals", "started_at", "finished_at", "hosts", "versions", "checkpoint",
                    "backend", "threads_per_rank")
# Options added after the golden files were made (at their defaults they change nothing), and what the redesign
# added to the summary (which communication backend ran) and to TensorFlow checkpoints (the next step's LR, as
# PyTorch's always had).
NEW_CONFIG_KEYS = ("backend", "compile")
NEW_SUMMARY_KEYS = ("communication",)
NEW_CHECKPOINT_KEYS = ("lr_next",)


def cpu_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def stable_summary(summary: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in summary.items() if k not in (*VOLATILE_SUMMARY, *NEW_SUMMARY_KEYS)}
    kept["config"] = {k: v for k, v in summary["config"].items() if k not in ("out", *NEW_CONFIG_KEYS)}
    kept["checkpoint_name"] = Path(summary["checkpoint"]).name if summary["checkpoint"] else None
    return kept


def flatten(prefix: str, value: Any, out: dict[str, np.ndarray]) -> None:
    """Every array-like leaf of a checkpoint payload under a path-like key (tensors become numpy arrays)."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            flatten(f"{prefix}/{key}", value[key], out)
    elif isinstance(value, (list, tuple)) and value and all(type(v) is int for v in value):
        out[prefix] = np.asarray(value, dtype=np.int64)  # e.g. Python's Mersenne Twister state
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            flatten(f"{prefix}/{i}", item, out)
    elif hasattr(value, "numpy") and hasattr(value, "shape"):
        out[prefix] = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value.numpy())
    elif isinstance(value, np.ndarray):
        out[prefix] = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = np.asarray(value)


def checkpoint_arrays(framework: str, run_dir: Path, step: int) -> dict[str, np.ndarray]:
    path = ckpt.checkpoint_path(run_dir, step)
    if framework == "torch":
        import torch

        state = torch.load(path, map_location="cpu", weights_only=False)
    else:
        with open(path, "rb") as handle:
            state = pickle.load(handle)
    arrays: dict[str, np.ndarray] = {}
    for key in ("model", "optimizer", "rng_per_rank", "step", "epoch", "position_in_epoch", "schedule_step",
                "lr_next"):
        if key in state and state[key] is not None:
            flatten(key, state[key], arrays)
    return arrays


def run_pinned(framework: str, out: Path) -> dict[str, Any]:
    run_ranks(2, ["-m", "scaling.train", *ARGS, "--framework", framework, "--out", str(out)],
              controller=CONTROLLER[framework], timeout=400)
    steps = [[{k: r[k] for k in STEP_KEYS} for r in read_steps(step_log_path(out, rank))] for rank in (0, 1)]
    summary = stable_summary(json.loads((out / "summary.json").read_text()))
    return {"steps": steps, "summary": summary,
            "checkpoints": {step: checkpoint_arrays(framework, out, step) for step in (3, 6)}}


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_the_trainer_reproduces_its_pinned_results(tmp_path: Path, framework: str) -> None:
    got = run_pinned(framework, tmp_path / "run")
    where = GOLDEN / framework
    if REGENERATE:
        where.mkdir(parents=True, exist_ok=True)
        (where / "steps.json").write_text(json.dumps(got["steps"], indent=1) + "\n")
        (where / "summary.json").write_text(json.dumps(got["summary"], indent=1, sort_keys=True) + "\n")
        for step, arrays in got["checkpoints"].items():
            np.savez_compressed(where / f"ckpt-{step}.npz", **arrays)
        (where / "cpu.txt").write_text(cpu_capability() + "\n")
        pytest.skip(f"regenerated {where}")
    exact = (where / "cpu.txt").read_text().strip() == cpu_capability()
    want_steps = json.loads((where / "steps.json").read_text())
    want_summary = json.loads((where / "summary.json").read_text())
    if exact:
        assert got["steps"] == want_steps
    else:
        for got_rank, want_rank in zip(got["steps"], want_steps, strict=True):
            for g, w in zip(got_rank, want_rank, strict=True):
                assert {k: v for k, v in g.items() if k != "loss"} == {k: v for k, v in w.items() if k != "loss"}
                assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)
    got_summary = json.loads(json.dumps(got["summary"]))  # tuples become lists, as in the saved file
    if not exact:  # evaluation counts may move by an image when the last logits round differently
        got_summary.pop("eval"), want_summary.pop("eval")
    assert got_summary == want_summary
    for step in (3, 6):
        with np.load(where / f"ckpt-{step}.npz") as saved:
            want = dict(saved)
        have = {k: v for k, v in got["checkpoints"][step].items() if k in want or k not in NEW_CHECKPOINT_KEYS}
        assert sorted(have) == sorted(want), f"checkpoint {step}: keys differ"
        for key in want:
            if exact:
                np.testing.assert_array_equal(have[key], want[key], err_msg=f"checkpoint {step} {key}")
            elif have[key].dtype.kind == "f":
                np.testing.assert_allclose(have[key], want[key], rtol=1e-5, atol=1e-7,
                                           err_msg=f"checkpoint {step} {key}")
