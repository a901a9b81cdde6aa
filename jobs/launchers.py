"""Launchers: how a job script starts the ranks of one point (srun, mpirun in its Open MPI, Intel MPI and MVAPICH
flavours, Cray PALS mpiexec, flux run, ibrun, horovodrun, jsrun, torchrun).

One small registered class per launcher (``@launcher``): the words before the trainer's command, the shell
lines a job needs before its points (host lists, the torch.distributed rendezvous), which communication
backends it can start (``training.backend``), and which signal makes its ranks checkpoint and stop. Adding a
launcher is one class here. Every word is a trusted constant, a validated integer, a profile flag (one word,
quoted later) or a :class:`ShellWord` that we generate and that must expand in the script; user values reach
bash only through ``shlex.quote`` (jobs/scripts.py).

Rank discovery of ``training.backend: ddp`` (the trainer's contract): under ``torchrun`` RANK/WORLD_SIZE/
LOCAL_RANK; under ``srun`` SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID with MASTER_ADDR/MASTER_PORT exported by
the script; under Open MPI's ``mpirun`` OMPI_COMM_WORLD_* with the rendezvous through MPI. Intel MPI, ibrun,
jsrun and horovodrun start ranks the trainer's DDP cannot place, so those combinations are refused.
"""

from __future__ import annotations

import shlex
from typing import ClassVar

from jobs.schedulers import get_scheduler
from jobs.sweep import TRAIN_MODULE, Plan, Point
from larscale.backends import LAUNCHER_BACKENDS

# Environment every rank gets (the trainer's TensorFlow path needs tf-keras, see README).
BASE_ENV = (("TF_USE_LEGACY_KERAS", "1"), ("PYTHONUNBUFFERED", "1"))


class ShellWord(str):
    """A word we generate that the script must expand (written inside double quotes, never shlex-quoted).
    User values are plain ``str`` and always quoted, even when they look like a variable."""


HOSTS = ShellWord("$LARSCALE_HOSTS")
RENDEZVOUS = ShellWord("$MASTER_ADDR:$MASTER_PORT")
# A free TCP port on this host (where the script runs: the allocation's first node, rank 0's).
FREE_PORT = 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'


def launcher_name(plan: Plan) -> str:
    """The sweep's launcher: the spec's ``job.launcher``, else the machine profile's."""
    return plan.spec.job.launcher or plan.machine.launcher


def profile_flags(plan: Plan, name: str) -> list[str]:
    """The profile's launcher_flags when ``name`` is the profile's launcher (they are its flags, not another's)."""
    return list(plan.machine.launcher_flags) if plan.machine.launcher == name else []


class Launcher:
    """Base class. A launcher starts Horovod ranks unless it lists more ``backends``; for ddp ranks the job
    exports the rendezvous (MASTER_ADDR/MASTER_PORT) before its points."""

    name: ClassVar[str]
    backends: ClassVar[tuple[str, ...]] = ("horovod",)
    # What the script sends the launcher at the walltime warning: it must reach every rank as SIGUSR1 or
    # SIGTERM (the trainer checkpoints and exits 75 on either).
    stop_signal: ClassVar[str] = "USR1"

    def refuse(self, plan: Plan, scheduler: str) -> str | None:
        """Why this launcher cannot start the plan's ranks under ``scheduler`` (None: it can)."""
        backend = plan.spec.training.backend
        if backend not in self.backends:
            return (f"{self.name} cannot start training.backend {backend!r} ranks (it starts "
                    f"{' or '.join(self.backends)}); {_ddp_hint() if backend == 'ddp' else 'use another launcher'}")
        return None

    def setup_lines(self, plan: Plan, points: list[Point], scheduler: str) -> list[str]:
        """Shell lines run once per job (whose points are ``points``) before its points."""
        return rendezvous_lines(plan, scheduler) if plan.spec.training.backend == "ddp" else []

    def command(self, plan: Plan, point: Point, program: list[str]) -> list[str]:
        """The whole command of one point: launcher words, then the trainer's (interpreter first)."""
        return [*self.words(plan, point), *program]

    def words(self, plan: Plan, point: Point) -> list[str]:
        raise NotImplementedError


def _ddp_hint() -> str:
    return "for ddp use launcher srun, mpirun (Open MPI) or torchrun (job.launcher: torchrun)"


LAUNCHERS: dict[str, type[Launcher]] = {}


def launcher(cls: type[Launcher]) -> type[Launcher]:
    """Register a launcher class under its ``name``."""
    LAUNCHERS[cls.name] = cls
    return cls


def get_launcher(name: str) -> Launcher:
    try:
        return LAUNCHERS[name]()
    except KeyError:
        raise ValueError(f"unknown launcher {name!r}; choose one of {', '.join(LAUNCHERS)}") from None


def rendezvous_lines(plan: Plan, scheduler: str) -> list[str]:
    """MASTER_ADDR/MASTER_PORT for torch.distributed: the allocation's first node (where the batch script runs,
    and rank 0 or the first torchrun agent with it) and a port free there, chosen once per job."""
    first_host = get_scheduler(scheduler).first_host()
    return ["# torch.distributed rendezvous: rank 0's host (the allocation's first node) and a free port there",
            f"export MASTER_ADDR={first_host}",
            f"export MASTER_PORT=$({' '.join(shlex.quote(w) for w in plan.python_words)} -c {shlex.quote(FREE_PORT)})"]


@launcher
class Srun(Launcher):
    name = "srun"
    backends = ("horovod", "ddp")

    def words(self, plan: Plan, point: Point) -> list[str]:
        return ["srun", f"--nodes={point.nodes}", f"--ntasks={point.ranks}",
                f"--ntasks-per-node={point.ranks_per_node}", f"--cpus-per-task={point.threads_per_rank}",
                *profile_flags(plan, self.name)]


@launcher
class Mpirun(Launcher):
    name = "mpirun"
    backends = ("horovod", "ddp")

    def refuse(self, plan: Plan, scheduler: str) -> str | None:
        if plan.spec.training.backend == "ddp" and plan.machine.mpi_flavor != "openmpi":
            return (f"ddp ranks find each other through Open MPI's variables; machine {plan.machine.name!r} "
                    f"has mpi_flavor {plan.machine.mpi_flavor!r}: {_ddp_hint()}")
        return super().refuse(plan, scheduler)

    def setup_lines(self, plan: Plan, points: list[Point], scheduler: str) -> list[str]:
        return []  # ddp under Open MPI meets through MPI itself (rank 0's host broadcast)

    def words(self, plan: Plan, point: Point) -> list[str]:
        flags = profile_flags(plan, self.name)
        ranks, rpn, threads = point.ranks, point.ranks_per_node, point.threads_per_rank
        if plan.machine.mpi_flavor == "intelmpi":
            binding = [] if any("I_MPI_PIN" in f for f in flags) else ["-genv", "I_MPI_PIN_DOMAIN", "omp"]
            return ["mpirun", "-n", str(ranks), "-ppn", str(rpn), "-genv", "OMP_NUM_THREADS", str(threads),
                    *binding, *flags]
        if plan.machine.mpi_flavor == "mvapich":
            # MVAPICH2 binds each rank to T cores with the hybrid policy; MVAPICH2-GDR moves GPU buffers itself.
            gpu = ["-genv", "MV2_USE_CUDA", "1"] if plan.on_gpus else []
            return ["mpirun", "-np", str(ranks), "-ppn", str(rpn), "-genv", "OMP_NUM_THREADS", str(threads),
                    "-genv", "MV2_CPU_BINDING_POLICY", "hybrid", "-genv", "MV2_THREADS_PER_PROCESS", str(threads),
                    *gpu, *flags]
        binding = [] if "--bind-to" in flags or "--map-by" in flags else [
            "--map-by", f"ppr:{rpn}:node:PE={threads}", "--bind-to", "core"]
        return ["mpirun", "-np", str(ranks), *binding, *export_flags(plan), *flags]


@launcher
class PalsMpiexec(Launcher):
    """HPE Cray PALS ``mpiexec`` (ALCF Polaris and Aurora): R ranks per node, each bound to T cores
    (``--depth T --cpu-bind depth``); ranks learn their place from PALS_RANKID / PALS_LOCAL_RANKID
    (larscale/launchenv.py), and each drives the GPU of its local rank."""

    name = "mpiexec"

    def words(self, plan: Plan, point: Point) -> list[str]:
        threads = point.threads_per_rank
        return ["mpiexec", "-n", str(point.ranks), "--ppn", str(point.ranks_per_node), "--depth", str(threads),
                "--cpu-bind", "depth", "--env", f"OMP_NUM_THREADS={threads}", *profile_flags(plan, self.name)]


@launcher
class FluxRun(Launcher):
    """``flux run`` inside a Flux allocation: one task per rank with its cores and, on GPUs, its GPU
    (FLUX_TASK_RANK / FLUX_TASK_LOCAL_ID, larscale/launchenv.py); MPI ranks meet through Flux's PMI."""

    name = "flux"

    def words(self, plan: Plan, point: Point) -> list[str]:
        gpus = ["-g", "1"] if plan.gpus_per_node(point.ranks_per_node) else []
        return ["flux", "run", "-N", str(point.nodes), "-n", str(point.ranks), "-c", str(point.threads_per_rank),
                *gpus, *profile_flags(plan, self.name)]


def export_flags(plan: Plan) -> list[str]:
    """Open MPI's ``-x NAME`` for every variable the script exports to the ranks."""
    names = ("OMP_NUM_THREADS", *(k for k, _ in BASE_ENV), *plan.spec.job.env, *plan.machine.environment)
    return [w for name in names for w in ("-x", name)]


@launcher
class Ibrun(Launcher):
    name = "ibrun"

    def words(self, plan: Plan, point: Point) -> list[str]:
        return ["ibrun", "-n", str(point.ranks), "-o", "0", *profile_flags(plan, self.name)]


@launcher
class Horovodrun(Launcher):
    name = "horovodrun"

    def setup_lines(self, plan: Plan, points: list[Point], scheduler: str) -> list[str]:
        return host_list_lines(scheduler, max(p.ranks_per_node for p in points))

    def words(self, plan: Plan, point: Point) -> list[str]:
        return ["horovodrun", "-np", str(point.ranks), "-H", HOSTS, *profile_flags(plan, self.name)]


def host_list_lines(scheduler: str, ranks_per_node: int) -> list[str]:
    """Shell lines that set LARSCALE_HOSTS=host1:R,host2:R for horovodrun, from the scheduler's node list."""
    r = int(ranks_per_node)
    src = get_scheduler(scheduler).hosts_command()
    if src is None:
        return ["LARSCALE_HOSTS=localhost:" + str(r)]
    return [f"LARSCALE_HOSTS=$({src} | sed 's/$/:{r}/' | paste -sd, -)"]


@launcher
class Jsrun(Launcher):
    name = "jsrun"

    def words(self, plan: Plan, point: Point) -> list[str]:
        gpus = 1 if plan.machine.node.devices.kind == "gpu" else 0
        return ["jsrun", f"--nrs={point.ranks}", "--tasks_per_rs=1", f"--cpu_per_rs={point.threads_per_rank}",
                f"--gpu_per_rs={gpus}", f"--rs_per_host={point.ranks_per_node}", *profile_flags(plan, self.name)]


@launcher
class Torchrun(Launcher):
    """PyTorch's elastic launcher (``python -m torch.distributed.run``, the interpreter's own torchrun): one
    agent per node starts that node's workers and they meet at a c10d rendezvous on the first node. Several
    nodes need one agent per node, started by ``srun --ntasks-per-node=1`` (Slurm only); one node runs it
    directly under any scheduler."""

    name = "torchrun"
    backends = LAUNCHER_BACKENDS["torchrun"]
    # torchrun's agent passes SIGTERM on to its workers (SIGUSR1 would end the agent and orphan them), then
    # waits up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s) before it kills them: the checkpoint must fit in that.
    stop_signal = "TERM"

    def refuse(self, plan: Plan, scheduler: str) -> str | None:
        many = sorted({p.nodes for p in plan.accepted if p.nodes > 1})
        if many and get_scheduler(scheduler).agent_launcher != "srun":
            return (f"torchrun on {many[0]} nodes needs one agent per node, which larscale starts with srun "
                    f"(Slurm); under {scheduler} use launcher mpirun (Open MPI) for multi-node ddp")
        return super().refuse(plan, scheduler)

    def command(self, plan: Plan, point: Point, program: list[str]) -> list[str]:
        # The interpreter (with a container's words before it): everything before "-m scaling.train".
        split = next(i for i in range(len(program) - 1) if program[i] == "-m" and program[i + 1] == TRAIN_MODULE)
        interpreter, rest = program[:split], program[split:]     # rest: -m scaling.train OPTIONS
        agents = ["srun", f"--nodes={point.nodes}", f"--ntasks={point.nodes}", "--ntasks-per-node=1",
                  f"--cpus-per-task={point.ranks_per_node * point.threads_per_rank}",
                  *profile_flags(plan, "srun")] if point.nodes > 1 else []
        return [*agents, *interpreter, "-m", "torch.distributed.run", f"--nnodes={point.nodes}",
                f"--nproc-per-node={point.ranks_per_node}", "--rdzv-backend=c10d", "--rdzv-endpoint", RENDEZVOUS,
                *rest]
