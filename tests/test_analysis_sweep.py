"""`sweep plan` with points the machine or the model cannot take: each refused with its reason, the rest planned."""

from __future__ import annotations

import subprocess
import sys

import yaml

from jobs.sweep import describe, plan
from larscale.machine import load_machine, parse_machine
from tests.conftest import REPO


def knl_spec(nodes: list[int], **job) -> dict:
    return {"name": "knl-weak", "model": "resnet50_v1", "framework": "torch", "dataset": "synthetic",
            "machine": "stampede2-knl", "training": {"epochs": 1, "optimizer": "lars", "lr": 0.1},
            "sweep": {"kind": "weak", "nodes": nodes, "batch_per_rank": 16, "threads_per_rank": 68},
            **({"job": job} if job else {})}


def test_points_beyond_max_nodes_are_refused_one_by_one(tmp_path) -> None:
    nodes = [64, 128, 256, 512, 1024, 2048, 4096, 8192]
    the_plan = plan(knl_spec(nodes), output_dir=tmp_path)
    by_nodes = {p.nodes: p for p in the_plan.points}
    assert [p.nodes for p in the_plan.refused] == [8192]
    assert "8192 nodes exceed the queue limit of 4200 nodes" in by_nodes[8192].refused
    assert by_nodes[8192].walltime_source == "none" and by_nodes[8192].node_hours == 0
    for n in nodes[:-1]:
        assert by_nodes[n].refused is None and by_nodes[n].walltime_source == "predicted"
        assert by_nodes[n].predicted_s > 0
    # Weak scaling of one epoch: more nodes, shorter runs.
    assert by_nodes[64].predicted_s > by_nodes[2048].predicted_s
    text = describe(the_plan)
    assert "REFUSED: 8192 nodes exceed" in text and "1 points refused" in text


def test_points_over_the_walltime_limit_are_refused_with_the_predicted_walltime(tmp_path) -> None:
    doc = load_machine("stampede2-knl").to_dict()
    doc["limits"]["max_walltime"] = "00:10:00"
    machine = parse_machine(doc)
    the_plan = plan(knl_spec([64, 512, 2048]), machine=machine, output_dir=tmp_path)
    refused = {p.nodes: p.refused for p in the_plan.refused}
    assert list(refused) == [64]
    assert "exceeds the queue limit 00:10:00" in refused[64] and "(predicted)" in refused[64]
    assert all(p.walltime_s <= 600 for p in the_plan.accepted) and len(the_plan.accepted) == 2


def test_a_point_the_model_cannot_predict_is_refused_alone(tmp_path, monkeypatch) -> None:
    from analysis.predict import predict_point

    def fails_at_1024(**kwargs):
        if kwargs["nodes"] == 1024:
            raise ValueError("no prediction at 1024 nodes")
        return predict_point(**kwargs)

    monkeypatch.setattr("jobs.sweep._predictor", lambda: fails_at_1024)
    the_plan = plan(knl_spec([512, 1024, 2048]), output_dir=tmp_path)
    assert [p.nodes for p in the_plan.refused] == [1024]
    assert "no prediction at 1024 nodes" in the_plan.refused[0].refused
    assert "give job.walltime" in the_plan.refused[0].refused
    assert [p.nodes for p in the_plan.accepted] == [512, 2048]
    # With a walltime given, nothing needs predicting: only the node limit refuses.
    the_plan = plan(knl_spec([64, 8192], walltime="01:00:00"), output_dir=tmp_path)
    assert [p.nodes for p in the_plan.refused] == [8192]
    assert the_plan.point("n64-p64-b1024").walltime_source == "user"


def test_sweep_plan_command_lists_the_refused_point_and_plans_the_rest(tmp_path) -> None:
    path = tmp_path / "knl.yaml"
    path.write_text(yaml.safe_dump(knl_spec([1024, 2048, 4096, 8192])))
    proc = subprocess.run([sys.executable, "-m", "larscale", "sweep", "plan", str(path)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr  # the rest is a plan
    assert "walltime prediction failed" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "1 point(s) refused, 3 planned" in proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("n")]
    assert len(lines) == 4 and sum("REFUSED" in line for line in lines) == 1
    assert "3 runs" in proc.stdout


def test_sweep_plan_with_every_point_refused_is_an_error(tmp_path) -> None:
    path = tmp_path / "knl.yaml"
    path.write_text(yaml.safe_dump(knl_spec([8192, 16384])))
    proc = subprocess.run([sys.executable, "-m", "larscale", "sweep", "plan", str(path)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and "every point is refused" in proc.stderr and "Traceback" not in proc.stderr
