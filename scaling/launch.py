"""Command lines that start N local ranks of a Python module with Open MPI or horovodrun.

Used by `larscale smoke`, the tests and the local scheduler. On a cluster users write their own
`srun`/`mpirun` lines (jobs/ generates them); this is the one-machine case, where we may oversubscribe
the cores and often run as root in containers.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# How local ranks are started: mpirun (Horovod then uses its MPI controller; DDP agrees on an address through MPI),
# horovodrun --gloo (Horovod's Gloo controller), or torchrun --standalone (DDP, --backend ddp).
CONTROLLERS = ("mpi", "gloo", "torchrun")

# glibc malloc settings (mallopt(3): M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_ARENA_MAX, read from these variables
# at start-up): keep freed memory for reuse instead of unmapping it, so each step's large tensors and Open MPI's
# per-call buffers are not page-faulted in anew. One arena, because another thread's arena (Horovod's background
# thread runs every allreduce) cannot hold a block over 64 MiB and would mmap it whatever the threshold. Every
# local launch gets them, so calibration, benchmarks and the runs they predict see one allocator (a caller's own
# values win). Their effect: benchmarks/README.md, "Measurement history".
QUIET_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
                "MALLOC_ARENA_MAX": "1"}


TORCHRUN_FRESH_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def local_env(base: Mapping[str, str] | None = None, threads_per_rank: int | None = None) -> dict[str, str]:
    """The environment local ranks need on top of ``base`` (default: this process's)."""
    env = dict(os.environ if base is None else base)
    # Open MPI refuses to start as root unless told twice; containers and CI run as root.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    # Horovod's TF functions need tf.Variables: Keras 3 variables break broadcast_variables.
    env.setdefault("TF_USE_LEGACY_KERAS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    for name, value in QUIET_MALLOC.items():
        env.setdefault(name, value)
    # torchrun: a fresh rendezvous store for every restart of the workers. Sharing the agent's store across
    # restarts (PyTorch's default) leaves the last round's addresses in it, and a restarted rank can read its peer's
    # old address before the peer has written the new one (Gloo/NCCL "connection refused"; PyTorch issue #135712).
    env.setdefault(TORCHRUN_FRESH_STORE, "1")
    if threads_per_rank is not None:
        env["OMP_NUM_THREADS"] = str(threads_per_rank)
    return env


def venv_tool(name: str) -> str:
    """A console script installed beside this interpreter (horovodrun), else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH: run ./bootstrap.sh")
    return found


def rank_command(
    ranks: int,
    program: Sequence[str],
    controller: str = "mpi",
    extra_launcher_args: Sequence[str] = (),
) -> list[str]:
    """argv that starts ``program`` (a full argv, interpreter included) on ``ranks`` local ranks.

    ``controller`` picks the launcher: ``mpi`` starts the ranks with ``mpirun`` (Horovod then uses MPI), ``gloo``
    with ``horovodrun --gloo``, ``torchrun`` with ``torchrun --standalone`` (for ``--backend ddp``; ``program``
    must then be ``[python, -m, module, ...]`` or ``[python, script, ...]``).
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if controller == "mpi":
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            raise FileNotFoundError("mpirun not found on PATH: run ./bootstrap.sh (installs Open MPI)")
        # --oversubscribe: more ranks than cores is normal on a laptop or CI box;
        # --bind-to none: binding 2 ranks to cores of a 2-core box makes each wait for the other.
        return [mpirun, "-np", str(ranks), "--oversubscribe", "--bind-to", "none",
                *extra_launcher_args, *program]
    if controller == "gloo":
        return [venv_tool("horovodrun"), "--gloo", "-np", str(ranks), "-H", f"localhost:{ranks}",
                *extra_launcher_args, *program]
    if controller == "torchrun":
        # torchrun runs the module with its own interpreter: the program's interpreter is dropped.
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc-per-node", str(ranks), *extra_launcher_args, *program[1:]]
    raise ValueError(f"unknown controller {controller!r}; choose one of {', '.join(CONTROLLERS)}")
