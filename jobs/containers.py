"""Containers: how each rank's command runs inside an image (one small registered class per runtime).

The profile's ``container`` (or the spec's ``job.container``; ``none`` drops the profile's) names a runtime, an
image and bind mounts; the sweep directory is always bound at its own path, so the trainer writes its run where
the script looks for it. Words are trusted constants or the user's image and bind paths, which
larscale/machine.py restricts to one printable word without ',' and which reach bash through ``shlex.quote``
like every other user value; pyxis's and Shifter's image also goes into an option or a directive, where the
same rule keeps it to one word.

- ``apptainer`` / ``singularity``: ``apptainer exec --nv`` (``--rocm`` on AMD GPUs) ``--bind A,B IMAGE CMD``;
- ``pyxis`` (Slurm's enroot plug-in): srun's ``--container-image=IMAGE --container-mounts=A,B`` (srun only);
- ``podman-hpc`` (NERSC): ``podman-hpc run --rm --mpi --gpu -v A -e NAME... IMAGE CMD``; the variables the script
  exports are passed in by name;
- ``shifter`` (NERSC): ``#SBATCH --image=IMAGE`` and ``shifter --volume=A CMD`` (Slurm only).
"""

from __future__ import annotations

from typing import ClassVar

from jobs.sweep import Plan
from larscale.machine import Container


def container_of(plan: Plan) -> Container | None:
    """The sweep's container: the spec's, else the profile's; ``none`` in the spec runs without one."""
    chosen = plan.spec.job.container
    if chosen == "none":
        return None
    return chosen if chosen is not None else plan.machine.container


class Runtime:
    name: ClassVar[str]

    def __init__(self, container: Container):
        self.container = container

    def binds(self, plan: Plan) -> list[str]:
        own = str(plan.output_dir)
        return [*self.container.binds, *([] if own in self.container.binds else [own])]

    def refuse(self, plan: Plan, launcher: str) -> str | None:
        return None

    def wrap(self, plan: Plan, env_names: list[str]) -> list[str]:
        """Words between the launcher's and the program's."""
        return []

    def launcher_flags(self, plan: Plan) -> list[str]:
        return []

    def site_lines(self, plan: Plan) -> list[str]:
        return []


RUNTIMES: dict[str, type[Runtime]] = {}


def runtime(cls: type[Runtime]) -> type[Runtime]:
    RUNTIMES[cls.name] = cls
    return cls


def get_runtime(plan: Plan) -> Runtime | None:
    container = container_of(plan)
    return None if container is None else RUNTIMES[container.runtime](container)


def gpu_vendor(plan: Plan) -> str | None:
    """nvidia or amd for a GPU profile (from the device's model), else None."""
    devices = plan.machine.node.devices
    if devices.kind != "gpu" or not plan.on_gpus:
        return None
    return "amd" if any(w in devices.model for w in ("AMD", "Instinct", "MI2", "MI3")) else "nvidia"


@runtime
class Apptainer(Runtime):
    name = "apptainer"

    def wrap(self, plan: Plan, env_names: list[str]) -> list[str]:
        gpu = {"nvidia": ["--nv"], "amd": ["--rocm"], None: []}[gpu_vendor(plan)]
        return [self.name, "exec", *gpu, "--bind", ",".join(self.binds(plan)), self.container.image]


@runtime
class Singularity(Apptainer):
    name = "singularity"


@runtime
class Pyxis(Runtime):
    name = "pyxis"

    def refuse(self, plan: Plan, launcher: str) -> str | None:
        return None if launcher == "srun" else f"pyxis containers start under srun, not {launcher}"

    def launcher_flags(self, plan: Plan) -> list[str]:
        mounts = ",".join(b if ":" in b else f"{b}:{b}" for b in self.binds(plan))
        return [f"--container-image={self.container.image}", f"--container-mounts={mounts}"]


@runtime
class PodmanHpc(Runtime):
    name = "podman-hpc"

    def wrap(self, plan: Plan, env_names: list[str]) -> list[str]:
        gpu = ["--gpu"] if gpu_vendor(plan) else []
        volumes = [w for b in self.binds(plan) for w in ("-v", b if ":" in b else f"{b}:{b}")]
        passed = [w for name in env_names for w in ("-e", name)]
        return ["podman-hpc", "run", "--rm", "--mpi", *gpu, *volumes, *passed, self.container.image]


@runtime
class Shifter(Runtime):
    name = "shifter"

    def refuse(self, plan: Plan, launcher: str) -> str | None:
        return None if plan.machine.scheduler == "slurm" else "shifter images are requested through Slurm"

    def site_lines(self, plan: Plan) -> list[str]:
        return [f"--image={self.container.image}"]

    def wrap(self, plan: Plan, env_names: list[str]) -> list[str]:
        return ["shifter", *(f"--volume={b if ':' in b else f'{b}:{b}'}" for b in self.container.binds)]
