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
backward; DDP's ``backward()`` returns once they are all done. The allreduce is DDP's own (each rank's gradients
scaled by 1/world size as they are copied into the buckets, then summed). A hook after each gradient's
accumulation notes when the last one became ready — when DDP launched the last bucket — so the step log can split
backward honestly: ``allreduce_s`` is the time from then to the end of backward — the communication that did not
hide behind backward — and ``compute_s`` the rest. On GPUs DDP makes the compute stream wait for NCCL without
blocking the host, so the host does not see when the allreduces end: there the exposed time stays inside
``compute_s`` and ``allreduce_s`` is ~0 (summary ``backend.allreduce_timing`` says which). Buffers are never
synchronised: like Horovod, each rank keeps its own BatchNorm running statistics, so checkpoints resume across the
two backends.

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

from larscale.launchenv import DDP_LAUNCH_VARIABLES
from scaling.config import TrainConfig, usage_error
from scaling.rank import RankInfo

TIMING_CPU = ("from the last gradient's accumulation (DDP launches the last bucket then) to the end of backward "
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
    # SLURM_STEP_ID: only inside an srun step (a batch script's own shell has SLURM_PROCID=0 and the job's
    # task count, and must not wait for ranks that are not there).
    candidates = DDP_LAUNCH_VARIABLES   # one table of every launcher's variables: larscale/launchenv.py
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


class GradientsReady:
    """A hook after each parameter's gradient is accumulated: notes when the latest one became ready and (re-)arms
    the watchdog. DDP launches a bucket's allreduce as soon as its gradients are ready and waits for all of them
    at the end of backward, where the lifecycle cannot wrap the wait: between two gradients backward is computing
    (one layer, well under the timeout), after the last one it only waits for the allreduces, which a dead or hung
    peer never completes."""

    def __init__(self, parameters: Any) -> None:
        self.last: float | None = None
        self.watchdog: Any = None
        self.timeout = math.inf
        for parameter in parameters:
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(self)

    def __call__(self, parameter: Any) -> None:
        self.last = time.perf_counter()
        if self.watchdog is not None:
            self.watchdog.arm("gradient allreduce (DDP, inside backward)", self.timeout)

    def disarm(self) -> None:
        if self.watchdog is not None:
            self.watchdog.disarm()


class DDPGradients:
    """Gradient averaging for a PyTorch model with DistributedDataParallel (see the module docstring)."""

    def __init__(self, model: Any, optimizer: Any, device: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel

        # init_sync off: the lifecycle broadcasts rank 0's (possibly resumed) weights itself, once; buffers are
        # never synchronised (with init_sync off, forward_sync_buffers=False means none at all), as under Horovod.
        # DDP's own allreduce (no communication hook): it scales the gradients while copying them into its
        # buckets, where a hook would add a pass over them (measured: 4 % of an AlexNet step on a CPU).
        self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              init_sync=False, forward_sync_buffers=False)
        self.ready = GradientsReady(model.parameters())
        self.optimizer = optimizer
        self.on_gpu = device.type == "cuda"
        self._syncing = True
        self._tail = 0.0

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Accumulating micro-batches skip the allreduce; the last one of a step runs it."""
        self._syncing = last
        return contextlib.nullcontext() if last else self.module.no_sync()

    def backward(self, loss: Any) -> None:
        self.ready.last = None
        loss.backward()
        ended = time.perf_counter()
        self.ready.disarm()  # the allreduces are done: what follows (the next forward) is compute
        if self._syncing and self.ready.last is not None:
            self._tail = max(0.0, ended - self.ready.last)

    def wait(self) -> float:
        """Nothing is left to wait for (DDP's backward waited); returns how long backward waited for it."""
        tail, self._tail = self._tail, 0.0
        return 0.0 if self.on_gpu else tail

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
            self._gradients.ready.watchdog, self._gradients.ready.timeout = watchdog, timeout

    def torch_gradients(self, model: Any, optimizer: Any, accumulation: int) -> DDPGradients:
        self._gradients = DDPGradients(model, optimizer, next(model.parameters()).device)
        self.watch(*self._watch)
        return self._gradients

    def close(self) -> None:
        """Leave together (a barrier), let go of the DDP wrapper (its reducer holds the process group) and destroy
        the process groups while every rank is still here."""
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                self.barrier()
            except Exception as err:  # a peer already gone: the run's own status says what happened
                print(f"larscale train: rank {self.launch.rank}: the closing barrier failed: {err}", file=sys.stderr,
                      flush=True)
            self._gradients = None
            gc.collect()
            try:
                dist.destroy_process_group()
            except Exception as err:
                print(f"larscale train: rank {self.launch.rank}: destroying the process group failed: {err}",
                      file=sys.stderr, flush=True)

    def leave(self, status: int) -> int:
        """End the process now, with ``status``, rather than through the interpreter's exit.

        ``destroy_process_group`` does not end Gloo's threads (its two work loops and its TCP loop) nor, on the rank
        that hosts it, the rendezvous store's server thread: the process group's C++ object stays referenced after
        it, so those threads are torn down by the interpreter's finalisation and the C++ runtime's exit, racing
        them. A thread that reaches for the interpreter lock after finalisation began is ended by CPython with
        ``pthread_exit``, and a joinable ``std::thread`` destroyed at exit calls ``std::terminate``: either way
        the rank dies of SIGABRT ("terminate called without an active exception", exit 134) after a complete
        run. Everything the run writes is written and closed by now (step logs, checkpoints, summary.json), so
        the rank flushes its streams, finalises MPI where mpirun started it (Open MPI counts a rank that exits
        without MPI_Finalize as failed) and exits without tearing anything else down. See
        benchmarks/ddp_exit_loop.py."""
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()
        os._exit(status)
