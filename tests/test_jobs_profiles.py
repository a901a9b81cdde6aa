"""The bundled profiles of current sites: each predicts (`larscale predict`), plans a GPU sweep whose scripts ask for
the GPUs, and refuses a point over its node-count bin's walltime with the reason."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jobs.scripts import render
from jobs.sweep import job_groups, plan
from larscale.machine import load_machine
from tests.conftest import REPO
from tests.test_jobs import base_spec

SITES = ["frontier", "polaris", "perlmutter-gpu", "perlmutter-cpu", "juwels-booster", "vista", "stampede3",
         "stampede3-skx", "stampede3-icx", "stampede3-h100"]


@pytest.mark.parametrize("name", SITES)
def test_predict_runs_on_each_site_profile(name: str) -> None:
    m = load_machine(name)
    rpn = m.default_ranks_per_node
    largest = min(8, m.limits.max_nodes)     # the h100 queue of Stampede3 takes 4 nodes
    proc = subprocess.run([sys.executable, "-m", "larscale", "predict", "--model", "resnet50", "--machine", name,
                           "--nodes", "2", str(largest), "--global-batch", str(largest * rpn * 32), "--format", "json"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 2 and all(r["images_per_s"] > 0 and r["iteration_s"] > 0 for r in rows)
    assert m.sources and all(s.strip() for s in m.sources)


def site_spec(machine: str, nodes: list[int], walltime: str) -> dict:
    spec = base_spec(machine=machine, sweep={"kind": "weak", "nodes": nodes, "global_batch": None,
                                             "batch_per_rank": 32, "ranks_per_node": None,
                                             "threads_per_rank": None},
                     job={"walltime": walltime, "account": "abc123", "partition": None, "qos": None})
    spec["sweep"] = {k: v for k, v in spec["sweep"].items() if v is not None}
    spec["job"] = {k: v for k, v in spec["job"].items() if v is not None}
    return spec


def test_frontier_bins_refuse_with_the_reason() -> None:
    the_plan = plan(site_spec("frontier", [1, 92], "03:00:00"), output_dir="/scratch/x")
    refused = {p.nodes: p.refused for p in the_plan.points}
    assert refused[92] is None
    assert refused[1] == ("walltime 03:00:00 (user) exceeds the queue limit 02:00:00 for 1-91 nodes "
                          "(limits.walltime_bins[0]) on 'frontier'")


def test_cli_sweep_plan_names_the_bin(tmp_path) -> None:
    import yaml

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(site_spec("polaris", [2, 10, 25], "04:00:00")))
    proc = subprocess.run([sys.executable, "-m", "larscale", "sweep", "plan", str(spec), "--format", "json"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    points = {p["nodes"]: p for p in json.loads(proc.stdout)["points"]}
    assert "01:00:00 for 1-9 nodes" in points[2]["refused"] and "03:00:00 for 10-24 nodes" in points[10]["refused"]
    assert points[25]["refused"] is None
    # node-hours of the accepted point, charged at the profile's factor
    assert json.loads(proc.stdout)["charge"] == {"factor": 1.0, "unit": "node-hours", "total": 25 * 4.0}
    proc = subprocess.run([sys.executable, "-m", "larscale", "sweep", "plan", str(spec)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0 and "2 point(s) refused, 1 planned" in proc.stderr
    assert "limits.walltime_bins[0]" in proc.stdout and "(100.00 node-hours at 1 per node-hour)" in proc.stdout


# TACC's Table 8: each Stampede3 queue is one row (1 to its largest job, 48 h) with its SUs per node-hour.
@pytest.mark.parametrize(("name", "largest", "sus"), [("stampede3", 32, 2.0), ("stampede3-icx", 32, 1.5),
                                                      ("stampede3-h100", 4, 4.0)])
def test_cli_sweep_plan_refuses_over_stampede3_queue_row(tmp_path, name: str, largest: int, sus: float) -> None:
    import yaml

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(site_spec(name, [2, largest], "49:00:00")))
    proc = subprocess.run([sys.executable, "-m", "larscale", "sweep", "plan", str(spec), "--format", "json"],
                          capture_output=True, text=True, cwd=REPO)
    reason = (f"walltime 49:00:00 (user) exceeds the queue limit 48:00:00 for 1-{largest} nodes "
              f"(limits.walltime_bins[0]) on '{name}'")
    assert proc.returncode == 2 and reason in proc.stderr       # every point refused: a usage error
    assert [p["refused"] for p in json.loads(proc.stdout)["points"]] == [reason, reason]
    spec.write_text(yaml.safe_dump(site_spec(name, [2, largest], "48:00:00")))
    proc = subprocess.run([sys.executable, "-m", "larscale", "sweep", "plan", str(spec), "--format", "json"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    planned = json.loads(proc.stdout)
    assert [p["refused"] for p in planned["points"]] == [None, None]
    assert planned["charge"] == {"factor": sus, "unit": "SUs", "total": sus * (2 + largest) * 48.0}


@pytest.mark.parametrize(("name", "wanted"), [
    ("frontier", ["#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=7", "module load PrgEnv-gnu rocm",
                  "--gpu-bind=closest", "--precision bf16", "--workers 6"]),
    ("polaris", ["#PBS -l select=2:ncpus=32:mpiprocs=4:ompthreads=8:ngpus=4", "#PBS -l filesystems=home:eagle",
                 "#PBS -q prod", "mpiexec -n 8 --ppn 4 --depth 8 --cpu-bind depth"]),
    ("perlmutter-gpu", ["#SBATCH -C gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=32",
                        "#SBATCH --qos=regular"]),
    ("juwels-booster", ["#SBATCH --gres=gpu:4", "#SBATCH --partition=booster"]),
    ("vista", ["#SBATCH --gpus-per-node=1", "#SBATCH --partition=gh", "ibrun -n 2"]),
    ("stampede3", ["#SBATCH --partition=spr", "#SBATCH --ntasks-per-node=2", "ibrun -n 4", "--device cpu"]),
    ("stampede3-icx", ["#SBATCH --partition=icx", "#SBATCH --ntasks-per-node=2", "ibrun -n 4", "--precision fp32"]),
    ("stampede3-h100", ["#SBATCH --partition=h100", "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=24",
                        "ibrun -n 8", "--device cuda", "--precision bf16"]),
])
def test_site_scripts_ask_for_gpus_and_cores(name: str, wanted: list[str]) -> None:
    the_plan = plan(site_spec(name, [2], "00:30:00"), output_dir="/scratch/x", python="/opt/py/bin/python")
    text = render(the_plan, job_groups(the_plan)[0])
    for line in wanted:
        assert line in text, f"{line!r} not in the {name} script:\n{text}"
    assert "module load cuda nccl openmpi" not in text
    syntax = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
