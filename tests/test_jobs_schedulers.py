"""Schedulers as registered classes (jobs/schedulers/): each one's directives, submission argv, job ids and states;
Flux, the scheduler added as one file, through a stand-in `flux` command (tests/standins/flux, whose output has
the shapes of flux-core's manual pages); one status query per poll interval; limits.max_jobs; walltime chains."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from jobs.schedulers import SCHEDULERS, JobRequest, SiteLineError, get_scheduler
from jobs.schedulers.flux import f58_to_decimal
from jobs.submit import parse_job_id, status, submit, wait
from jobs.sweep import plan
from larscale.machine import Limits, load_machine
from tests.test_jobs import base_spec, stand_in_env

STANDINS = Path(__file__).with_name("standins")
JOB = JobRequest(name="ls-x-n2", nodes=2, ranks_per_node=4, threads_per_rank=8, walltime_s=5400, signal_s=90,
                 gpus_per_node=4, account="acct1", partition="gpu")


def test_every_scheduler_is_one_registered_file() -> None:
    files = {p.stem for p in (Path(__file__).parents[1] / "jobs" / "schedulers").glob("*.py")} - {"__init__"}
    assert set(SCHEDULERS) == files == {"slurm", "pbs", "lsf", "local", "flux"}


@pytest.mark.parametrize(("name", "wanted"), [
    ("slurm", ["#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=8", "#SBATCH --account=acct1"]),
    ("pbs", ["#PBS -l select=2:ncpus=32:mpiprocs=4:ompthreads=8:ngpus=4", "#PBS -q gpu"]),
    ("lsf", ['#BSUB -gpu "num=4"', "#BSUB -n 8", '#BSUB -R "span[ptile=4]"', "#BSUB -W 1:30"]),
    ("flux", ["# flux: -N 2", "# flux: -n 8", "# flux: -c 8", "# flux: -g 1", "# flux: -t 90m",
              "# flux: --bank=acct1", "# flux: --queue=gpu"]),
])
def test_gpu_directives(name: str, wanted: list[str]) -> None:
    lines = get_scheduler(name).directives(JOB)
    for line in wanted:
        assert line in lines, lines
    assert not [x for x in get_scheduler(name).directives(replace(JOB, gpus_per_node=0)) if "gpu" in x.lower()
                and "partition" not in x and "-q gpu" not in x and "queue=gpu" not in x]


def test_an_unknown_scheduler_or_launcher_is_refused_when_planning() -> None:
    from larscale.schema import SchemaError

    with pytest.raises(SchemaError, match=r"^machine.scheduler: unknown scheduler 'sge'; choose one of flux, local, "
                       r"lsf, pbs, slurm"):
        plan(base_spec(), machine=replace(load_machine("stampede2-knl"), scheduler="sge"), output_dir="/x")
    from jobs.scripts import check_launch

    with pytest.raises(SchemaError, match=r"^job.launcher: unknown launcher 'aprun'"):
        check_launch(plan(base_spec(job={"launcher": "aprun"}), output_dir="/x"))


def test_slurm_gres_form() -> None:
    assert "#SBATCH --gres=gpu:4" in get_scheduler("slurm").directives(replace(JOB, gpu_request="gres"))


@pytest.mark.parametrize(("name", "after", "argv"), [
    ("slurm", ("11", "12"), ["sbatch", "--parsable", "--dependency=afterany:11:12", "scripts/a.sh"]),
    ("pbs", ("11.s",), ["qsub", "-W", "depend=afterany:11.s", "scripts/a.sh"]),
    ("lsf", ("11",), ["bsub", "-w", "ended(11)"]),
    ("flux", ("11",), ["flux", "batch", "--dependency=afterany:11", "scripts/a.sh"]),
])
def test_dependent_submission(name: str, after: tuple, argv: list[str]) -> None:
    assert get_scheduler(name).submit_argv("scripts/a.sh", after)[0] == argv
    assert "depend" not in " ".join(get_scheduler(name).submit_argv("scripts/a.sh")[0])


def test_flux_reads_the_real_tools_listing() -> None:
    """`flux jobs` lines as the real tool printed them (flux-framework/flux-workflow-examples,
    job-submit-cli/README.md), cut to the JOBID and ST columns larscale asks for."""
    recorded = ["ƒ3ETxsR9H moussa1 io-forward R 1 1 2.858s 2", "ƒ38rBqEWT moussa1 compute.lu R 4 2 15.6s [0-1]"]
    from subprocess import CompletedProcess

    lines = "\n".join(" ".join(line.split()[i] for i in (0, 3)) for line in recorded)
    states = get_scheduler("flux").query([f58_to_decimal("ƒ3ETxsR9H"), f58_to_decimal("ƒ38rBqEWT")],
                                         lambda argv: CompletedProcess(argv, 0, lines, ""))
    assert [s for s, _ in states.values()] == ["running", "running"]


def test_job_ids() -> None:
    assert parse_job_id("flux", "ƒM7Zq9AKHno\n") == "149394041430081536"
    assert parse_job_id("flux", "fM7Zq9AKHno\n") == "149394041430081536"     # ASCII locales print f
    assert f58_to_decimal("ƒ1") == "0" and f58_to_decimal("x y") == ""
    with pytest.raises(RuntimeError, match="cannot read a job id"):
        parse_job_id("flux", "error: no resources\n")


@pytest.mark.parametrize(("name", "line", "words"), [
    ("slurm", "--wrap=touch x", "--wrap is not allowed"),
    ("slurm", "-t10", "-t is not allowed"),
    ("slurm", "-C gpu\n#SBATCH --x", "one printable line"),
    ("slurm", "echo hi", "starting with '-'"),
    ("lsf", "-E touch x", "-E is not allowed in a site line (it runs a command)"),
    ("lsf", "-Ep touch x", "-Ep is not allowed"),
    ("pbs", "-S /bin/sh", "-S is not allowed"),
    ("flux", "--setattr=system.shell=x", "--setattr is not allowed"),
    ("local", "--exclusive", "reads no directives"),
])
def test_site_lines_that_could_inject_are_refused(name: str, line: str, words: str) -> None:
    with pytest.raises(SiteLineError, match=words.replace("(", r"\(").replace(")", r"\)")):
        get_scheduler(name).check_site_line(line)


def test_site_lines_are_written_among_the_directives() -> None:
    lines = get_scheduler("slurm").directives(replace(JOB, site_lines=("-C gpu", "--exclusive")))
    assert lines[-2:] == ["#SBATCH -C gpu", "#SBATCH --exclusive"]
    assert get_scheduler("pbs").directives(replace(JOB, site_lines=("-l filesystems=home:eagle",)))[-1] == \
        "#PBS -l filesystems=home:eagle"


# ------------------------------------------------------------------------------------------- flux stand-in


def flux_env(tmp_path: Path) -> dict[str, str]:
    state = tmp_path / "flux-state"
    state.mkdir()
    return {**stand_in_env(tmp_path, path_first=(STANDINS,)), "FLUX_STANDIN": str(state)}


def flux_plan(tmp_path: Path, max_jobs: int | None = None, chain: int = 1, batches=(2, 4)):
    machine = load_machine("local")
    machine = replace(machine, scheduler="flux", limits=Limits(max_nodes=1, max_walltime="02:00:00",
                                                               max_jobs=max_jobs))
    spec = base_spec(machine="local", sweep={"kind": "grid", "nodes": [1], "global_batch": None,
                                             "global_batches": list(batches), "ranks_per_node": 1,
                                             "threads_per_rank": 1},
                     training={"steps": 3, "image_size": 32, "warmup_steps": 0},
                     job={"retry_backoff_s": 0, "chain": chain, "qos": None})
    return plan(spec, machine=machine, output_dir=tmp_path / "sweep")


def calls(env: dict[str, str], verb: str) -> list[list[str]]:
    path = Path(env["FLUX_STANDIN"]) / "calls"
    return [c for c in map(json.loads, path.read_text().splitlines()) if c[0] == verb] if path.exists() else []


def allow_fast_polls(out: Path) -> None:
    """The test's own profile answer: poll the stand-in every 0.2 s (a real site keeps the 30 s minimum)."""
    data = json.loads((out / "manifest.json").read_text())
    data["machine"]["limits"]["poll_interval_s"] = 0.2
    (out / "manifest.json").write_text(json.dumps(data))


def test_flux_sweep_one_query_per_poll_and_max_jobs(tmp_path: Path) -> None:
    env = flux_env(tmp_path)
    hold = Path(env["FLUX_STANDIN"]) / "hold"
    hold.write_text("")
    the_plan = flux_plan(tmp_path, max_jobs=1)
    script = the_plan.output_dir / "scripts" / "ls-golden-n1-p1-b2.sh"
    manifest = submit(the_plan, env=env)
    text = script.read_text()
    assert "# flux: -N 1" in text and "# flux: -t 90m" in text and "LARSCALE_JOB_ID=${LARSCALE_JOB_ID:-$(flux" in text
    first, second = manifest.points["n1-p1-b2"], manifest.points["n1-p1-b4"]
    # limits.max_jobs 1: one job queued, the other held back with the reason.
    assert first.state == "submitted" and first.job_id == "149394041430081537"
    assert second.state == "planned" and "limits.max_jobs 1" in second.reason and len(calls(env, "batch")) == 1
    for _ in range(4):   # four status requests within the poll interval (30 s): one `flux jobs` query
        states = status(the_plan.output_dir, env)
    assert len(calls(env, "jobs")) == 1 and states.points["n1-p1-b2"].state == "pending"
    assert calls(env, "jobs")[0][-1] == "149394041430081537"
    hold.unlink()
    allow_fast_polls(the_plan.output_dir)
    done = wait(the_plan.output_dir, timeout=120, poll_s=0.2, env=env)
    assert {r.state for r in done.points.values()} == {"complete"}, [(r.point_id, r.reason)
                                                                     for r in done.points.values()]
    # The held job was submitted once the first had ended, never beside it.
    assert done.points["n1-p1-b4"].job_id == "149394041430081538"
    assert [a.job_id for a in done.points["n1-p1-b2"].attempts] == ["149394041430081537"]
    records = (the_plan.output_dir / "status" / "n1-p1-b2.attempts.jsonl").read_text()
    assert '"job": "149394041430081537"' in records       # FLUX_JOB_ID (F58) turned into the decimal id


def test_flux_walltime_chain_runs_links_after_each_other(tmp_path: Path) -> None:
    env = flux_env(tmp_path)
    the_plan = flux_plan(tmp_path, chain=2, batches=(2,))
    manifest = submit(the_plan, env=env)
    rec = manifest.points["n1-p1-b2"]
    assert rec.chain == ["149394041430081537", "149394041430081538"]
    batch = calls(env, "batch")
    assert batch[1][1] == "--dependency=afterany:149394041430081537"
    allow_fast_polls(the_plan.output_dir)
    done = wait(the_plan.output_dir, timeout=120, poll_s=0.2, env=env).points["n1-p1-b2"]
    assert done.state == "complete" and done.job_id in rec.chain
    log = (the_plan.output_dir / "logs" / "flux-149394041430081538.out").read_text()
    assert "is complete: not run again" in log       # the second link found the point complete


def test_a_scheduler_that_does_not_answer_leaves_jobs_active(tmp_path: Path) -> None:
    """squeue timing out (a busy controller) is no answer: the queued job stays pending, not 'missing'."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/bash\necho 4242\n")
    (bin_dir / "squeue").write_text("#!/bin/bash\necho 'slurm_load_jobs error: Socket timed out on send/recv "
                                    "operation' >&2\nexit 1\n")
    for tool in ("sbatch", "squeue"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    the_plan = plan(base_spec(sweep={"nodes": [1]}), output_dir=tmp_path / "sweep")
    submit(the_plan, env=env)
    rec = status(the_plan.output_dir, env).points["n1-p2-b256"]
    assert rec.state == "pending" and "NO ANSWER" in rec.reason and rec.job_id == "4242"
