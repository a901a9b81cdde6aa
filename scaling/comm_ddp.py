"""PyTorch's own data parallelism: ``torch.distributed`` + ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU).

For sites where Horovod does not build: nothing beyond PyTorch is needed.

Who is in the job comes from the launcher's environment (:func:`launch_environment`):

- ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``;
- ``srun``: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; the job script exports ``MASTER_ADDR`` (the
  allocation's first host) and ``MASTER_PORT``;
- ``mpirun`` (Open MPI; MPICH/Intel MPI's ``PMI_RANK``): ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK``; the
  rendezvous address is ``MASTER_ADDR``:``MASTER_PORT`` when set, else rank 0's host name and a free port, sent to
  the others with an MPI broadcast (mpi4py);
- no launcher: one rank on 127.0.0.1.

``horovodrun`` starts Horovod jobs only and is refused. Under ``torchrun --max-restarts N`` launch with
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (larscale's launchers and job scripts set it): by default the restarted
workers rendezvous in the store of the failed round, where a rank can read its peer's old address before the peer
wrote the new one (PyTorch issue #135712); a restarted rank that finds the shared store in use says so.

Ranks per node, when the launcher does not say, are counted from the gathered host names.

Gradients: DDP's buckets (25 MiB by default) are allreduced as backward fills them, overlapping the rest of
backward; DDP's ``backward()`` returns once they are all done. The allreduce is DDP's default (each rank divides
its bucket by the world size, then sums), run through a communication hook that notes when each bucket was
launched, so the step log can split backward honestly: ``allreduce_s`` is the time from the last bucket's launch
(the last gradients were ready then) to the end of backward — the communication that did not hide behind
backward — and ``compute_s`` the rest. On GPUs DDP makes the compute stream wait for NCCL without blocking the
host, so no hook sees when the allreduces end: there the exposed time stays inside ``compute_s`` and
``allreduce_s`` is ~0 (summary ``backend.allreduce_timing`` says which). ``broadcast_buffers`` is off: like
Horovod, each rank keeps its own BatchNorm running statistics, so checkpoints resume across the two backends.

Small control collectives (the stop vote, objects, evaluation counts) go through a gloo group on the CPU even when
the gradients use NCCL: reading a GPU tensor's value would stall the device queue at every step.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import math
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scaling.config import TrainConfig, usage_error
from scaling.rank import RankInfo

TIMING_CPU = ("DDP communication hook: from the last gradient bucket's allreduce launch to the end of backward "
              "(the allreduce time not hidden behind backward)")
TIMING_GPU = "not separable under NCCL: the exposed allreduce time is part of compute_s"


@dataclass(frozen=True)
class LaunchEnvironment:
    """Rank, world size and (when given) node-local rank and size, as the launcher set them."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int | None = None
    local_size: int | None = None


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise usage_error(f"--backend ddp: {name}={value!r} is not an integer") from None


def launch_environment(env: Mapping[str, str] | None = None) -> LaunchEnvironment:
    """Who this process is, from its launcher's variables (see the module docstring)."""
    env = os.environ if env is None else env
    if "HOROVOD_RANK" in env:
        raise usage_error("--backend ddp cannot run under horovodrun (it starts Horovod jobs); launch with torchrun, "
                          "srun or mpirun, or use --backend horovod")
    candidates = (
        ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
         "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("mpirun", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        # SLURM_STEP_ID: only inside an srun step (a batch script's own shell has SLURM_PROCID=0 and the job's
        # task count, and must not wait for ranks that are not there).
        ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", None),
    )
    for launcher, rank_var, size_var, local_var, local_size_var in candidates:
        if launcher == "srun" and "SLURM_STEP_ID" not in env:
            continue
        rank, size = _int(env, rank_var), _int(env, size_var)
        if rank is None or size is None:
            continue
        if not 0 <= rank < size:
            raise usage_error(f"--backend ddp: {rank_var}={rank} is not below {size_var}={size}")
        return LaunchEnvironment(launcher, rank, size, _int(env, local_var),
                                 _int(env, local_size_var) if local_size_var else None)
    return LaunchEnvironment("none", 0, 1, 0, 1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def rendezvous(launch: LaunchEnvironment, env: Mapping[str, str] | None = None) -> str:
    """The ``init_method`` URL every rank agrees on."""
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if addr and port:
        return "env://"
    if launch.world_size == 1:
        return f"tcp://127.0.0.1:{free_port()}"
    if launch.launcher == "mpirun":
        try:
            from mpi4py import MPI
        except ImportError:
            raise usage_error("--backend ddp under mpirun needs MASTER_ADDR and MASTER_PORT, or mpi4py to agree on "
                              "them") from None
        here = (socket.gethostname(), free_port()) if launch.rank == 0 else None
        host, chosen = MPI.COMM_WORLD.bcast(here, root=0)
        return f"tcp://{host}:{chosen}"
    raise usage_error(f"--backend ddp under {launch.launcher}: set MASTER_ADDR (the first host of the job, e.g. "
                      "$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)) and MASTER_PORT (a free port)")


class LaunchTimes:
    """The state of :func:`timed_allreduce`: the world size, when the latest bucket was launched, and the watchdog
    to arm (DDP waits for its allreduces inside backward, where the lifecycle cannot wrap the wait)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.last_launch: float | None = None
        self.watchdog: Any = None
        self.timeout = math.inf


# A DDP communication hook: DDP's default averaging allreduce, noting when each bucket was launched. Each launch
# (re-)arms the watchdog: between two launches backward is computing (a layer's gradients, well under the timeout),
# after the last one it only waits for the allreduces, which a dead or hung peer never completes. No annotations
# on purpose: DDP checks a hook's signature and accepts only the real GradBucket/Future types there.
def timed_allreduce(state, bucket):  # noqa: ANN001, ANN201
    import torch.distributed as dist

    state.last_launch = time.perf_counter()
    if state.watchdog is not None:
        state.watchdog.arm("gradient allreduce (DDP, inside backward)", state.timeout)
    tensor = bucket.buffer()
    tensor.div_(state.world_size)
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


class DDPGradients:
    """Gradient averaging for a PyTorch model with DistributedDataParallel (see the module docstring)."""

    def __init__(self, model: Any, optimizer: Any, device: Any, world_size: int) -> None:
        from torch.nn.parallel import DistributedDataParallel

        # init_sync off: the lifecycle broadcasts rank 0's (possibly resumed) weights itself, once; buffers are
        # never synchronised (with init_sync off, forward_sync_buffers=False means none at all), as under Horovod.
        self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              init_sync=False, forward_sync_buffers=False)
        self.timer = LaunchTimes(world_size)
        self.module.register_comm_hook(self.timer, timed_allreduce)
        self.optimizer = optimizer
        self.on_gpu = device.type == "cuda"
        self._backward_end: float | None = None

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Accumulating micro-batches skip the allreduce; the last one of a step runs it."""
        return contextlib.nullcontext() if last else self.module.no_sync()

    def backward(self, loss: Any) -> None:
        loss.backward()
        self._backward_end = time.perf_counter()

    def wait(self) -> float:
        """Nothing is left to wait for (DDP's backward waited); returns how long backward waited for them."""
        launched, ended = self.timer.last_launch, self._backward_end
        self.timer.last_launch = self._backward_end = None
        if self.on_gpu or launched is None or ended is None:
            return 0.0
        return max(0.0, ended - launched)

    def step_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def broadcast_parameters(self, state: Mapping[str, Any]) -> None:
        import torch.distributed as dist

        for tensor in state.values():
            dist.broadcast(tensor, src=0)


class DistributedDataParallel:
    """The torch.distributed communicator (gradients through :class:`DDPGradients`)."""

    name = "ddp"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.launch = launch_environment()
        self.device_type = config.device
        self.control_group: Any = None
        self.process_group_backend = "nccl" if config.device == "cuda" else "gloo"
        self._gradients: DDPGradients | None = None
        self._watch: tuple[Any, float] = (None, math.inf)

    def start(self) -> RankInfo:
        import torch.distributed as dist

        if not dist.is_available():
            raise usage_error("--backend ddp: this PyTorch was built without torch.distributed")
        launch = self.launch
        if self.process_group_backend == "nccl" and not dist.is_nccl_available():
            raise usage_error("--backend ddp --device cuda: this PyTorch has no NCCL; use --device cpu (gloo)")
        timeout = _dt.timedelta(seconds=max(300.0, 5 * self.config.stall_timeout))
        if launch.rank == 0 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0") \
                and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            print("larscale train: warning: torchrun restarted the workers in its shared rendezvous store, where they "
                  "may read the failed round's addresses; launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
                  file=sys.stderr, flush=True)
        dist.init_process_group(self.process_group_backend, init_method=rendezvous(launch), rank=launch.rank,
                                world_size=launch.world_size, timeout=timeout)
        if self.process_group_backend != "gloo":
            self.control_group = dist.new_group(backend="gloo", timeout=timeout)
        local_rank, local_size = launch.local_rank, launch.local_size
        if local_rank is None or local_size is None:
            hosts = self.allgather_object(socket.gethostname(), "larscale.hosts")
            mine = hosts[launch.rank]
            local_rank = hosts[:launch.rank].count(mine)
            local_size = hosts.count(mine)
        controller = "none" if launch.launcher == "none" else self.process_group_backend
        return RankInfo(launch.rank, launch.world_size, local_rank, local_size, controller)

    def broadcast_object(self, obj: Any, name: str) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def allgather_object(self, obj: Any, name: str) -> list[Any]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj, group=self.control_group)
        return gathered

    def begin_stop_vote(self, stop: bool) -> Any:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if stop else 0.0])
        return flag, dist.all_reduce(flag, group=self.control_group, async_op=True)

    def end_stop_vote(self, pending: Any) -> bool:
        flag, work = pending
        work.wait()
        return flag.item() > 0

    def sum(self, values: Sequence[float], name: str) -> list[float]:
        import torch
        import torch.distributed as dist

        total = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(total, group=self.control_group)
        return total.tolist()

    def barrier(self) -> None:
        import torch
        import torch.distributed as dist

        dist.all_reduce(torch.zeros(1), group=self.control_group)

    def describe(self) -> dict[str, Any]:
        import torch.distributed as dist

        return {"communication": "ddp", "process_group": self.process_group_backend, "launcher": self.launch.launcher,
                "nccl": bool(dist.is_nccl_available()),
                "allreduce_timing": TIMING_GPU if self.device_type == "cuda" else TIMING_CPU}

    def versions(self) -> dict[str, str]:
        return {}

    def watch(self, watchdog: Any, timeout: float) -> None:
        self._watch = (watchdog, timeout)
        if self._gradients is not None:
            self._gradients.timer.watchdog, self._gradients.timer.timeout = watchdog, timeout

    def torch_gradients(self, model: Any, optimizer: Any, accumulation: int) -> DDPGradients:
        import torch.distributed as dist

        device = next(model.parameters()).device
        self._gradients = DDPGradients(model, optimizer, device, dist.get_world_size())
        self.watch(*self._watch)
        return self._gradients

    def close(self) -> None:
        """Leave together, then tear the process groups down before the interpreter exits: rank 0 hosts the
        rendezvous store (srun, mpirun), and a rank still tearing its Gloo threads down when the store's host is
        gone was seen to abort at exit ("terminate called without an active exception", exit 134)."""
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                self.barrier()
            # The DDP wrapper's reducer holds the process group: released first, so that destroying the group
            # really ends its threads now rather than during the interpreter's shutdown.
            self._gradients = None
            gc.collect()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
