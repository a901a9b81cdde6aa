"""Predicted vs measured: put a calibrated profile's prediction beside what a real run measured.

The measured iteration time is :func:`analysis.calibrate.read_run`'s: the median over measured steps
(warm-up excluded) of the slowest rank's step time, because a synchronous step ends when its slowest rank
does. The prediction is :func:`analysis.predict.predict` for the run's own model, image size, placement
(nodes × ranks per node) and global batch, so the comparison checks the model, not a fit of the run itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from analysis.calibrate import read_run, workload_key
from analysis.predict import predict
from larscale.machine import MachineProfile


def compare_run(run_dir: str | Path, profile: MachineProfile) -> dict[str, Any]:
    """One row: the run's configuration, the prediction's breakdown, the measurement and the relative error."""
    measured = read_run(run_dir)
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    nodes = int(summary.get("nodes") or 1)
    ranks_per_node = int(summary.get("ranks_per_node") or measured.ranks // nodes)
    # At the run's own input size: the prediction then reads the calibration's measured images/s for this
    # exact network and size (key model@size), never another size's.
    predicted = predict(measured.model, profile, nodes=nodes, global_batch=measured.ranks * measured.batch_per_rank,
                        ranks_per_node=ranks_per_node, epochs=1, image_size=measured.image_size).record(0)
    return {
        "run": Path(run_dir).name,
        "model": workload_key(measured.model, measured.image_size),
        "ranks": measured.ranks,
        "nodes": nodes,
        "batch_per_rank": measured.batch_per_rank,
        "global_batch": measured.ranks * measured.batch_per_rank,
        "predicted_s": predicted["iteration_s"],
        "predicted_compute_s": predicted["compute_s"],
        "predicted_comm_s": predicted["comm_total_s"],
        "predicted_comm_exposed_s": predicted["comm_exposed_s"],
        "measured_s": measured.step_s,
        "measured_allreduce_s": measured.allreduce_s,
        "measured_compute_s": measured.compute_s,
        "steps_measured": measured.steps_measured,
        "error": predicted["iteration_s"] / measured.step_s - 1.0,
    }


def compare_runs(run_dirs: Iterable[str | Path], profile: MachineProfile) -> list[dict[str, Any]]:
    return [compare_run(run_dir, profile) for run_dir in run_dirs]
