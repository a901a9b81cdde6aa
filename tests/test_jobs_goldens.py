"""Golden scripts of GPU-era jobs: every bundled profile with its own scheduler and launcher, every launcher on a
GPU profile, every container runtime; each also passes `bash -n`. Regenerate with LARSCALE_UPDATE_GOLDEN=1 (and
read the diff: a golden is only as good as the review of the code that wrote it)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from jobs.scripts import render
from jobs.sweep import job_groups, plan
from larscale.machine import Container, bundled_machines, load_machine
from tests.test_jobs import base_spec, check_golden

PYTHON = "/opt/py/bin/python"
OUT = "/scratch/sweeps/gpu"


def gpu_spec(nodes: list[int], **job) -> dict:
    spec = base_spec(name="gpu", sweep={"kind": "weak", "nodes": nodes, "global_batch": None, "batch_per_rank": 64,
                                        "ranks_per_node": None, "threads_per_rank": None},
                     job={"walltime": "00:30:00", "account": "proj1", "partition": None, "qos": None, "env": {},
                          **job})
    spec["sweep"] = {k: v for k, v in spec["sweep"].items() if v is not None}
    spec["job"] = {k: v for k, v in spec["job"].items() if v is not None}
    return spec


@pytest.mark.parametrize("profile", bundled_machines())
def test_every_bundled_profile(profile: str) -> None:
    m = load_machine(profile)
    nodes = [1, 2] if m.limits.max_nodes >= 2 else [1]
    walltime = "00:30:00"
    the_plan = plan(gpu_spec(nodes, walltime=walltime), machine=m, output_dir=OUT, python=PYTHON)
    group = job_groups(the_plan)[-1]
    text = render(the_plan, group)
    check_golden(f"profiles/{profile}.sh", text)
    if m.node.devices.kind == "gpu":
        assert "--device cuda" in text and f"--precision {the_plan.precision}" in text
        assert the_plan.gpus_per_node(group.points[0].ranks_per_node) == m.default_ranks_per_node


GPU_LAUNCHERS = [("srun", "openmpi", "slurm"), ("mpirun", "openmpi", "slurm"), ("mpirun", "intelmpi", "slurm"),
                 ("mpirun", "mvapich", "slurm"), ("mpiexec", "openmpi", "pbs"), ("flux", "openmpi", "flux"),
                 ("ibrun", "openmpi", "slurm"), ("horovodrun", "openmpi", "lsf"), ("jsrun", "openmpi", "lsf")]


@pytest.mark.parametrize(("launcher", "flavor", "scheduler"), GPU_LAUNCHERS)
def test_every_launcher_on_gpus(launcher: str, flavor: str, scheduler: str) -> None:
    m = replace(load_machine("dgx-h100"), scheduler=scheduler, launcher=launcher, mpi_flavor=flavor,
                launcher_flags=[])
    the_plan = plan(gpu_spec([2]), machine=m, output_dir=OUT, python=PYTHON)
    text = render(the_plan, job_groups(the_plan)[0])
    name = launcher + (f"-{flavor}" if launcher == "mpirun" else "")
    check_golden(f"gpu/{scheduler}-{name}.sh", text)
    assert "--cpus-per-task=14" in text or "ncpus=112" in text or "-c 14" in text or "--depth 14" in text \
        or 'span[ptile=8]' in text


def test_torchrun_on_gpus() -> None:
    the_plan = plan(gpu_spec([2], launcher="torchrun") | {"training": {**base_spec()["training"], "backend": "ddp"}},
                    machine=load_machine("dgx-h100"), output_dir=OUT, python=PYTHON)
    check_golden("gpu/slurm-torchrun.sh", render(the_plan, job_groups(the_plan)[0]))


CONTAINERS = [("apptainer", "dgx-h100", "srun"), ("singularity", "dgx-h100", "srun"), ("pyxis", "dgx-h100", "srun"),
              ("podman-hpc", "perlmutter-gpu", "srun"), ("shifter", "perlmutter-gpu", "srun"),
              ("apptainer", "frontier", "srun")]


@pytest.mark.parametrize(("runtime", "profile", "launcher"), CONTAINERS)
def test_every_container_runtime(runtime: str, profile: str, launcher: str) -> None:
    container = {"runtime": runtime, "image": "docker://nvcr.io/nvidia/pytorch:24.05-py3"
                 if runtime != "shifter" else "docker:nersc/pytorch:24.06.01", "binds": ["/lus/data:/data"]}
    the_plan = plan(gpu_spec([2], container=container), machine=load_machine(profile), output_dir=OUT,
                    python=["python3", "-X", "faulthandler"])
    text = render(the_plan, job_groups(the_plan)[0])
    check_golden(f"containers/{profile}-{runtime}.sh", text)
    if runtime in ("apptainer", "singularity"):
        assert f"{runtime} exec {'--rocm' if profile == 'frontier' else '--nv'} --bind /lus/data:/data,{OUT}" in text
    if runtime == "shifter":
        assert "#SBATCH --image=docker:nersc/pytorch:24.06.01" in text


def test_container_none_drops_the_profiles() -> None:
    m = replace(load_machine("dgx-h100"), container=Container(runtime="apptainer", image="img.sif"))
    with_it = plan(gpu_spec([1]), machine=m, output_dir=OUT, python=PYTHON)
    without = plan(gpu_spec([1], container="none"), machine=m, output_dir=OUT, python=PYTHON)
    assert "apptainer exec --nv" in render(with_it, job_groups(with_it)[0])
    assert "apptainer" not in render(without, job_groups(without)[0])


@pytest.mark.parametrize(("change", "path", "words"), [
    ({"container": {"runtime": "pyxis", "image": "img"}, "launcher": "mpirun"}, "job.container", "start under srun"),
    ({"container": {"runtime": "apptainer", "image": "a b"}}, "job.container.image", "without spaces"),
    ({"container": {"runtime": "apptainer", "image": "i", "binds": ["/a,/b"]}}, "job.container.binds", "','"),
    ({"site_lines": ["--wrap=rm -rf ~"]}, "job.site_lines[0]", "--wrap is not allowed"),
])
def test_container_and_site_line_mistakes_name_the_field(change: dict, path: str, words: str) -> None:
    from jobs.scripts import check_launch
    from larscale.schema import SchemaError

    with pytest.raises(SchemaError) as info:
        the_plan = plan(gpu_spec([1], **change), machine=load_machine("dgx-h100"), output_dir=OUT, python=PYTHON)
        check_launch(the_plan)
        render(the_plan, job_groups(the_plan)[0])
    assert info.value.path == path and words in info.value.reason, str(info.value)
