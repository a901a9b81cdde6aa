"""jobs/: spec validation, point expansion, cost, golden scripts per scheduler x launcher, manifest, collect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from jobs.collect import collect
from jobs.manifest import load_manifest
from jobs.scripts import render
from jobs.spec import parse_spec
from jobs.submit import parse_job_id, submit
from jobs.sweep import job_groups, plan
from larscale.machine import load_machine
from larscale.schema import SchemaError
from tests.conftest import REPO

GOLDEN = Path(__file__).with_name("golden") / "jobs"
LAUNCHERS = [("srun", "openmpi"), ("mpirun", "openmpi"), ("mpirun", "intelmpi"), ("ibrun", "openmpi"),
             ("horovodrun", "openmpi"), ("jsrun", "openmpi")]
SCHEDULERS = ["slurm", "pbs", "lsf", "local"]


def base_spec(**over) -> dict:
    spec = {
        "name": "golden",
        "model": "resnet50",
        "framework": "torch",
        "dataset": "synthetic",
        "machine": "stampede2-knl",
        "sweep": {"kind": "strong", "nodes": [1, 2, 4], "global_batch": 256, "ranks_per_node": 2,
                  "threads_per_rank": 16},
        "training": {"steps": 50, "optimizer": "lars", "lr": 2.0, "lr_scaling": "linear", "base_batch": 128,
                     "warmup_steps": 5, "checkpoint_every": 10, "image_size": 64},
        "job": {"walltime": "01:30:00", "account": "A-ccsc", "partition": "normal", "qos": "debug",
                "signal_s": 90, "env": {"HOROVOD_FUSION_THRESHOLD": "67108864"}},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


# ------------------------------------------------------------------------------------------------ spec


def test_spec_round_trips_and_expands_a_geometric_range() -> None:
    spec = parse_spec(base_spec(sweep={"nodes": {"start": 2, "stop": 33, "factor": 2}}))
    assert spec.sweep.nodes == [2, 4, 8, 16, 32]
    assert parse_spec(spec.to_dict()) == spec


@pytest.mark.parametrize(("change", "path", "words"), [
    ({"sweep": {"nodes": [1, 2, 0]}}, "sweep.nodes[2]", "> 0"),
    ({"sweep": {"nodes": [1, "x"]}}, "sweep.nodes[1]", "integer"),
    ({"sweep": {"nodes": [2, 2]}}, "sweep.nodes[1]", "twice"),
    ({"sweep": {"nodes": {"start": 8, "stop": 2}}}, "sweep.nodes.stop", ">= start"),
    ({"sweep": {"nodes": {"start": 1, "stop": 8, "factor": 1}}}, "sweep.nodes.factor", ">= 2"),
    ({"sweep": {"kind": "weak"}}, "sweep.batch_per_rank", "required"),
    ({"sweep": {"batch_per_rank": 4}}, "sweep.batch_per_rank", "not used"),
    ({"sweep": {"kind": "sideways"}}, "sweep.kind", "one of"),
    ({"training": {"epochs": 3}}, "training.steps", "exactly one"),
    ({"training": {"lr_preset": True}}, "training.lr_preset", "lr"),
    ({"job": {"walltime": "90 minutes"}}, "job.walltime", "HH:MM:SS"),
    ({"job": {"account": "a;rm -rf /"}}, "job.account", "letters"),
    ({"job": {"env": {"BAD NAME": "1"}}}, "job.env.BAD NAME", "environment names"),
    ({"name": "my sweep"}, "name", "letters"),
    ({"model": "lenet"}, "model", "unknown model"),
    ({"dataset": "cifar"}, "dataset", "synthetic"),
    ({"repetitions": 0}, "repetitions", "> 0"),
    ({"trainig": {}}, "trainig", "did you mean 'training'"),
])
def test_invalid_specs_name_the_field(change: dict, path: str, words: str) -> None:
    with pytest.raises(SchemaError) as info:
        parse_spec(base_spec(**change))
    assert info.value.path == path, str(info.value)
    assert words in info.value.reason


def test_missing_required_fields_are_named() -> None:
    data = base_spec()
    del data["training"]
    with pytest.raises(SchemaError, match="training: required field is missing"):
        parse_spec(data)


# ------------------------------------------------------------------------------------------------ plan


def test_strong_weak_grid_points_and_cost() -> None:
    strong = plan(base_spec(), output_dir="/scratch/x")
    assert [(p.nodes, p.ranks, p.global_batch, p.batch_per_rank) for p in strong.points] == [
        (1, 2, 256, 128), (2, 4, 256, 64), (4, 8, 256, 32)]
    # linear rule: lr · B / base_batch = 2 · 256 / 128
    assert {p.lr for p in strong.points} == {4.0}
    # node-hours = Σ nodes · 1.5 h
    assert strong.node_hours == pytest.approx((1 + 2 + 4) * 1.5)
    weak = plan(base_spec(sweep={"kind": "weak", "global_batch": None, "batch_per_rank": 32}), output_dir="/x")
    assert [p.global_batch for p in weak.points] == [64, 128, 256]
    grid = plan(base_spec(sweep={"kind": "grid", "global_batch": None, "global_batches": [64, 128]},
                          repetitions=2), output_dir="/x")
    assert len(grid.points) == 3 * 2 * 2
    assert len({p.point_id for p in grid.points}) == len(grid.points)
    assert {p.seed for p in grid.points} == {0, 1}


def test_bad_inputs_give_clear_errors() -> None:
    with pytest.raises(SchemaError, match=r"^machine: unknown machine 'cray-9000'"):
        plan(base_spec(machine="cray-9000"))
    with pytest.raises(SchemaError) as info:
        plan(base_spec(sweep={"nodes": [1, 3], "global_batch": 256}))
    assert info.value.path == "sweep.global_batch" and "not divisible by 6 ranks" in info.value.reason
    over = plan(base_spec(sweep={"nodes": [1, 8192]}), output_dir="/x")
    assert [p.nodes for p in over.refused] == [8192]
    assert "exceed the queue limit of 4200 nodes" in over.refused[0].refused
    with pytest.raises(ValueError, match="refused"):
        submit(over, dry_run=True)
    too_long = plan(base_spec(job={"walltime": "72:00:00"}), output_dir="/x")
    assert len(too_long.refused) == 3 and "exceeds the queue limit 48:00:00" in too_long.refused[0].refused


def run_cli(*argv: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "larscale", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env)


def test_cli_plan_prints_cost_and_refuses_cleanly(tmp_path: Path) -> None:
    import yaml

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base_spec()))
    proc = run_cli("sweep", "plan", str(good), "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "10.50 node-hours" in proc.stdout and "n4-p8-b256" in proc.stdout
    # A point over the queue limit is refused with its reason; the rest is still a plan (exit 0).
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump(base_spec(sweep={"nodes": [1, 5000]})))
    proc = run_cli("sweep", "plan", str(partial))
    assert proc.returncode == 0, proc.stderr
    assert "5000 nodes exceed the queue limit" in proc.stdout and "1 point(s) refused, 1 planned" in proc.stderr
    for spec, words in ((base_spec(sweep={"nodes": [5000]}), "5000 nodes exceed the queue limit"),
                        (base_spec(machine="nowhere"), "unknown machine 'nowhere'"),
                        (base_spec(sweep={"global_batch": 250}), "not divisible"),
                        (base_spec(sweep={"nodes": [1, -2]}), "sweep.nodes[1]: must be > 0")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(spec))
        proc = run_cli("sweep", "plan", str(bad))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert words in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_walltime_from_prediction_plus_margin() -> None:
    pytest.importorskip("analysis.predict")
    from analysis.predict import predict_point  # noqa: F401

    spec = base_spec(job={"walltime": None, "walltime_margin": 2.0, "startup_s": 60})
    spec["job"] = {k: v for k, v in spec["job"].items() if v is not None}
    p = plan(spec, output_dir="/x")
    for point in p.points:
        assert point.walltime_source == "predicted" and point.predicted_s > 0
        # (T + startup) · margin, rounded up to a whole minute
        expected = (point.predicted_s + 60) * 2.0
        assert expected <= point.walltime_s < expected + 60
    # More nodes on a fixed problem: never a longer predicted run than 8x the 1-node one.
    assert p.points[-1].predicted_s <= p.points[0].predicted_s * 8


def test_packing_puts_small_points_in_one_allocation() -> None:
    packed = plan(base_spec(repetitions=3, job={"pack": True, "pack_walltime": "03:00:00"}), output_dir="/x")
    groups = job_groups(packed)
    # 3 node counts x 3 repetitions of 1.5 h; at most 2 fit in 3 h -> 2 jobs per node count
    assert [(g.nodes, len(g.points)) for g in groups] == [(1, 2), (1, 1), (2, 2), (2, 1), (4, 2), (4, 1)]
    text = render(packed, groups[0])
    assert text.count("then larscale_run ") == 2 and "#SBATCH --time=03:00:00" in text


# ------------------------------------------------------------------------------------------------ scripts


def golden_plan(scheduler: str, launcher: str, flavor: str):
    machine = load_machine("stampede2-knl")
    machine = replace(machine, scheduler=scheduler, launcher=launcher, mpi_flavor=flavor,
                      launcher_flags=["--verbose"] if launcher != "mpirun" else [])
    return plan(base_spec(), machine=machine, output_dir="/scratch/sweeps/golden", python="/opt/py/bin/python")


def check_golden(name: str, text: str) -> None:
    """``text`` equals tests/golden/jobs/NAME (rewritten with LARSCALE_UPDATE_GOLDEN=1) and is valid bash."""
    golden = GOLDEN / name
    if os.environ.get("LARSCALE_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"missing golden {golden}: run with LARSCALE_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"{name} differs from its golden file"
    syntax = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize(("launcher", "flavor"), LAUNCHERS)
def test_golden_scripts(scheduler: str, launcher: str, flavor: str) -> None:
    the_plan = golden_plan(scheduler, launcher, flavor)
    group = job_groups(the_plan)[1]
    text = render(the_plan, group)
    check_golden(f"{scheduler}-{launcher}" + (f"-{flavor}" if launcher == "mpirun" else "") + ".sh", text)
    # The point's facts are in the script in the scheduler's own words.
    assert "--global-batch 256" in text and "--out /scratch/sweeps/golden/runs/n2-p4-b256" in text
    if scheduler != "local":
        assert {"slurm": "--time=01:30:00", "pbs": "walltime=01:30:00", "lsf": "-W 1:30"}[scheduler] in text


# training.backend: ddp (torch.distributed): (golden name, scheduler, profile launcher, job.launcher, job index).
DDP_GOLDENS = [("slurm-srun-ddp", "slurm", "srun", None, 1),
               ("slurm-mpirun-openmpi-ddp", "slurm", "mpirun", None, 1),
               ("slurm-torchrun", "slurm", "srun", "torchrun", 1),      # 2 nodes: one torchrun per node by srun
               ("pbs-torchrun", "pbs", "mpirun", "torchrun", 0),        # 1 node: torchrun itself
               ("local-torchrun", "local", "mpirun", "torchrun", 0)]


def ddp_plan(scheduler: str, launcher: str, job_launcher: str | None, flavor: str = "openmpi",
             backend: str = "ddp", one_node: bool = False):
    machine = replace(load_machine("stampede2-knl"), scheduler=scheduler, launcher=launcher, mpi_flavor=flavor,
                      launcher_flags=["--verbose"] if launcher == "srun" else [])
    job = {"launcher": job_launcher} if job_launcher else {}
    spec = base_spec(training={"backend": backend}, job=job, sweep={"nodes": [1] if one_node else [1, 2, 4]})
    return plan(spec, machine=machine, output_dir="/scratch/sweeps/golden", python="/opt/py/bin/python")


@pytest.mark.parametrize(("name", "scheduler", "launcher", "job_launcher", "index"), DDP_GOLDENS,
                         ids=[g[0] for g in DDP_GOLDENS])
def test_golden_ddp_scripts(name: str, scheduler: str, launcher: str, job_launcher: str | None,
                            index: int) -> None:
    # torchrun outside Slurm starts one node's workers only: those sweeps stay on one node.
    one_node = job_launcher == "torchrun" and scheduler != "slurm"
    the_plan = ddp_plan(scheduler, launcher, job_launcher, one_node=one_node)
    text = render(the_plan, job_groups(the_plan)[index])
    golden = GOLDEN / f"{name}.sh"
    if os.environ.get("LARSCALE_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text(), f"{name}.sh differs from its golden file"
    syntax = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert "--backend ddp" in text
    # The walltime and the plan do not depend on the backend.
    horovod = ddp_plan(scheduler, launcher, None, backend="horovod", one_node=one_node)
    assert [p.params() for p in the_plan.points] == [p.params() for p in horovod.points]
    if launcher == "srun" or job_launcher == "torchrun":
        assert "export MASTER_ADDR=" in text and "export MASTER_PORT=" in text
    if job_launcher == "torchrun":
        assert "larscale_signal=TERM" in text and "-m torch.distributed.run" in text
        assert '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"' in text


@pytest.mark.parametrize(("setup", "path", "words"), [
    (("slurm", "horovodrun", None), "training.backend", "horovodrun cannot start training.backend 'ddp'"),
    (("slurm", "ibrun", None), "training.backend", "ibrun cannot start"),
    (("slurm", "jsrun", None), "training.backend", "jsrun cannot start"),
    (("slurm", "mpirun", None, "intelmpi"), "training.backend", "mpi_flavor 'intelmpi'"),
    (("lsf", "mpirun", "torchrun"), "job.launcher", "torchrun on 2 nodes needs one agent per node"),
    (("slurm", "mpirun", "horovodrun"), "job.launcher", "horovodrun cannot start"),
])
def test_launchers_that_cannot_start_ddp_are_refused(setup: tuple, path: str, words: str, tmp_path: Path) -> None:
    the_plan = ddp_plan(*setup)
    with pytest.raises(SchemaError) as info:
        render(the_plan, job_groups(the_plan)[1])
    assert info.value.path == path and words in info.value.reason, str(info.value)
    with pytest.raises(SchemaError, match=words):     # nothing is written or submitted
        submit(the_plan, dry_run=True)


@pytest.mark.parametrize(("change", "path", "words"), [
    ({"framework": "tensorflow", "training": {"backend": "ddp"}}, "training.backend", "PyTorch models only"),
    ({"job": {"launcher": "torchrun"}}, "job.launcher", "needs training.backend: ddp"),
    ({"training": {"backend": "nccl"}}, "training.backend", "one of 'horovod', 'ddp'"),
    ({"job": {"max_retries": -1}}, "job.max_retries", ">= 0"),
    ({"job": {"retry_backoff_s": -5}}, "job.retry_backoff_s", ">= 0"),
])
def test_backend_and_retry_fields_name_the_culprit(change: dict, path: str, words: str) -> None:
    with pytest.raises(SchemaError) as info:
        parse_spec(base_spec(**change))
    assert info.value.path == path and words in info.value.reason, str(info.value)


def test_cli_plan_refuses_a_launcher_that_cannot_start_ddp(tmp_path: Path) -> None:
    import yaml

    spec = tmp_path / "ddp.yaml"
    spec.write_text(yaml.safe_dump(base_spec(training={"backend": "ddp"}, job={"launcher": "horovodrun"})))
    proc = run_cli("sweep", "plan", str(spec), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "job.launcher: horovodrun cannot start" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_golden_directory_has_no_stale_files() -> None:
    names = {f"{s}-{l}" + (f"-{f}" if l == "mpirun" else "") + ".sh" for s in SCHEDULERS for l, f in LAUNCHERS}
    names |= {f"{g[0]}.sh" for g in DDP_GOLDENS}
    assert {p.name for p in GOLDEN.glob("*.sh")} == names


def test_job_ids_are_parsed_from_each_scheduler() -> None:
    assert parse_job_id("slurm", "4242\n") == "4242"
    assert parse_job_id("slurm", "4242;cluster\n") == "4242"
    assert parse_job_id("pbs", "1234.pbs01\n") == "1234.pbs01"
    assert parse_job_id("lsf", "Job <987> is submitted to queue <normal>.\n") == "987"
    with pytest.raises(RuntimeError, match="cannot read a job id"):
        parse_job_id("slurm", "")


# ------------------------------------------------------------------------------------------------ manifest + collect


def fake_tool_dir(tmp_path: Path) -> Path:
    """A PATH entry whose `mpirun` runs the program after its own options, like Open MPI with one rank, so
    the local scheduler runs a real command; `python -m scaling.train` is replaced by a small stand-in that
    writes the run-directory files of the trainer contract (the real trainer is exercised in the Slurm tests)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mpirun").write_text("#!/bin/bash\nwhile [ $# -gt 0 ] && [ \"${1#-}\" != \"$1\" ]; do\n"
                                    "  case $1 in -np|-x|--bind-to|--map-by) shift 2;; *) shift;; esac\ndone\n"
                                    "exec \"$@\"\n")
    (bin_dir / "mpirun").chmod(0o755)
    return bin_dir


STAND_IN = r'''
import json, os, sys, time
args = sys.argv[1:]
opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
out = opt["--out"]; os.makedirs(out + "/steps", exist_ok=True)
gb, steps = int(opt["--global-batch"]), int(opt["--steps"])
if gb == 999:
    sys.exit(3)
with open(out + "/steps/rank-00000.jsonl", "w") as fh:
    for s in range(steps):
        fh.write(json.dumps({"step": s, "epoch": 0, "rank": 0, "ranks": 1, "batch_per_rank": gb, "global_batch": gb,
            "data_s": 0.0, "compute_s": 0.01, "allreduce_s": 0.0, "optimizer_s": 0.0, "step_s": 0.01 * (s + 1),
            "images_per_s": gb / (0.01 * (s + 1)), "lr": 0.1, "loss": 1.0, "time": time.time()}) + "\n")
    fh.write("{not json\n")
t = {"images_per_s": gb / 0.02, "ci95_low": gb / 0.03, "ci95_high": gb / 0.01, "per_rank_images_per_s": [gb / 0.02]}
summary = {"schema": "larscale.run/1", "status": "complete", "config": opt, "model": opt["--model"],
    "framework": "torch", "dataset": "synthetic", "device": "cpu", "precision": "fp32", "ranks": 1,
    "ranks_per_node": 1, "nodes": 1, "hosts": ["h"], "threads_per_rank": 1, "global_batch": gb,
    "batch_per_rank": gb, "steps_done": steps, "steps_planned": steps, "warmup_steps_excluded": 0,
    "versions": {"python": "3", "torch": "2", "horovod": "0.28"}, "controller": "none", "throughput": t,
    "times": {"step_s": 0.02, "data_s": 0.0, "compute_s": 0.01, "allreduce_s": 0.0, "optimizer_s": 0.0},
    "eval": None, "started_at": "a", "finished_at": "b", "checkpoint": None}
json.dump(summary, open(out + "/summary.json", "w"))
'''


def stand_in_env(tmp_path: Path, trainer: str = STAND_IN, path_first: tuple[Path, ...] = ()) -> dict[str, str]:
    """The environment of a local job whose mpirun (:func:`fake_tool_dir`) and ``scaling.train`` (``trainer``)
    are stand-ins; ``path_first`` goes before them on PATH (other stand-in commands)."""
    bin_dir = fake_tool_dir(tmp_path)
    package = tmp_path / "standin" / "scaling"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(trainer)
    path = ":".join(map(str, (*path_first, bin_dir)))
    return {**os.environ, "PATH": f"{path}:{os.environ['PATH']}", "PYTHONPATH": str(package.parent)}


def test_local_submit_manifest_and_collect(tmp_path: Path) -> None:
    env = stand_in_env(tmp_path)
    spec = base_spec(machine="local", sweep={"kind": "grid", "nodes": [1], "global_batch": None,
                                             "global_batches": [2, 4, 999], "ranks_per_node": 1,
                                             "threads_per_rank": 1},
                     training={"steps": 3, "image_size": 32, "warmup_steps": 0}, job={"retry_backoff_s": 0})
    the_plan = plan(spec, output_dir=tmp_path / "sweep")
    events = []
    manifest = submit(the_plan, env=env, progress=events.append)
    assert [e.state for e in events if e.state != "running"] == ["complete", "complete", "failed"]
    assert (events[-1].done, events[-1].failed) == (2, 1)
    again = load_manifest(tmp_path / "sweep")
    assert {pid: r.state for pid, r in again.points.items()} == {
        "n1-p1-b2": "complete", "n1-p1-b4": "complete", "n1-p1-b999": "failed"}
    assert again.points["n1-p1-b999"].exit_status == 3
    # Exit 3 before any step: retried once in the job, then "no progress" (tests/test_jobs_retry.py has the rules).
    assert [a.cause for a in again.points["n1-p1-b999"].attempts] == ["submitted", "retry"]
    assert "no progress" in again.points["n1-p1-b999"].reason
    summary_before = Path(again.points["n1-p1-b2"].run_dir, "summary.json").stat().st_mtime_ns
    # Resubmitting runs only the failed point, with --resume; finished results stay untouched.
    manifest = submit(the_plan, env=env)
    failed = manifest.points["n1-p1-b999"]
    assert [(a.cause, a.resume) for a in failed.attempts] == [("submitted", False), ("retry", True),
                                                               ("submitted", True), ("retry", True)]
    assert f'larscale_run n1-p1-b999 {failed.run_dir} resume "${{larscale_argv[@]}}"' in Path(failed.script).read_text()
    assert len(manifest.points["n1-p1-b2"].attempts) == 1
    assert Path(again.points["n1-p1-b2"].run_dir, "summary.json").stat().st_mtime_ns == summary_before

    result = collect(tmp_path / "sweep")
    table = result.table.set_index("point_id")
    assert len(table) == 3
    assert table.loc["n1-p1-b4", "images_per_s"] == pytest.approx(4 / 0.02)
    # slowest-rank median over steps 0.01, 0.02, 0.03
    assert table.loc["n1-p1-b4", "median_step_s"] == pytest.approx(0.02)
    assert table.loc["n1-p1-b4", "global_batch"] == 4 and table.loc["n1-p1-b4", "state"] == "complete"
    malformed = [p for p in result.problems if p.kind == "malformed"]
    assert len(malformed) == 2 and all(p.line == 4 and p.file.endswith("rank-00000.jsonl") for p in malformed)
    assert [p.point_id for p in result.problems if p.kind == "failed"] == ["n1-p1-b999"]
    import pandas as pd

    assert len(pd.read_parquet(result.parquet_path)) == 3 and len(pd.read_csv(result.csv_path)) == 3
    strict = run_cli("sweep", "collect", str(tmp_path / "sweep"), "--strict")
    assert strict.returncode == 1 and "rank-00000.jsonl:4" in strict.stderr
    assert run_cli("sweep", "collect", str(tmp_path / "sweep")).returncode == 0
    status = run_cli("sweep", "status", str(tmp_path / "sweep"))
    assert status.returncode == 0 and "exit status 3" in status.stdout


def test_manifest_is_written_atomically(tmp_path: Path) -> None:
    the_plan = plan(base_spec(), output_dir=tmp_path / "s")
    manifest = submit(the_plan, dry_run=True)
    data = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert data["schema"] == "larscale.sweep/1" and set(data["points"]) == {p.point_id for p in the_plan.points}
    assert all(r["state"] == "planned" and Path(r["script"]).exists() for r in data["points"].values())
    assert not list((tmp_path / "s").glob(".manifest.json.*"))
    assert manifest.path == tmp_path / "s" / "manifest.json"
    with pytest.raises(ValueError, match="holds sweep 'golden'"):
        submit(plan(base_spec(name="other"), output_dir=tmp_path / "s"), dry_run=True)


@pytest.mark.parametrize("example", sorted((REPO / "jobs" / "examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_bundled_example_specs_plan(example: Path, tmp_path: Path) -> None:
    the_plan = plan(example, output_dir=tmp_path)
    assert the_plan.points and not the_plan.refused and the_plan.node_hours > 0
    manifest = submit(the_plan, dry_run=True)
    for rec in manifest.points.values():
        syntax = subprocess.run(["bash", "-n", rec.script], capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr


def test_papers_sweeps_get_walltimes_near_the_papers_times() -> None:
    """The predicted 2048-KNL ResNet-50 run (paper: 20 min) and 1024-SKX AlexNet run (paper: 11 min) get
    walltimes of the right size: (prediction + 2 min) · 1.5 within [paper, 3 · paper]."""
    pytest.importorskip("analysis.predict")
    resnet = plan(REPO / "jobs" / "examples" / "resnet50-knl-strong.yaml", output_dir="/x").point("n2048-p2048-b32768")
    alexnet = plan(REPO / "jobs" / "examples" / "alexnet-skx-grid.yaml", output_dir="/x").point("n1024-p1024-b32768")
    assert 20 * 60 <= resnet.walltime_s <= 3 * 20 * 60
    assert 11 * 60 <= alexnet.walltime_s <= 3 * 11 * 60
