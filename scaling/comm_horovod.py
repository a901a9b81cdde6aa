"""Horovod communicators: ring-allreduce through Horovod's background thread (MPI or Gloo controller; NCCL on GPUs).

Gradients (PyTorch): ``hvd.DistributedOptimizer`` registers a hook per parameter that starts the allreduce of its
gradient as soon as backward has produced it, so allreduces overlap the rest of backward; ``wait`` blocks in
``optimizer.synchronize()`` for those still running — the step log's ``allreduce_s`` — and the update then runs
under ``skip_synchronize()``. With ``--accumulation k`` Horovod accumulates k backward passes locally and reduces
once (``backward_passes_per_step``).

Gradients (TensorFlow): ``hvd.grouped_allreduce(grads, op=Average)`` after backward, one fused group, timed as
``allreduce_s``. It is the reduction ``hvd.DistributedGradientTape`` performs inside ``gradient()``; split out so
that its time can be measured (on CPU TensorFlow returns all gradients of a tape at once, so little overlap is lost).

The stop vote: PyTorch's is an ``allreduce_async`` started at one step boundary and read at the next (it overlaps a
step and costs nothing); TensorFlow has no asynchronous eager allreduce, so its vote is one tiny synchronous
collective per step, read at the next boundary like PyTorch's so both stop at the same step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from larscale.launchenv import MPI_LAUNCH_VARIABLES
from scaling.config import TrainConfig, usage_error
from scaling.rank import RankInfo

ALLREDUCE_TIMING = "time blocked in optimizer.synchronize() after backward (allreduces still running)"
LAUNCHER_VARIABLES = MPI_LAUNCH_VARIABLES  # set only in processes an MPI launcher or horovodrun started


def import_horovod(module: str) -> Any:
    """``horovod.torch`` or ``horovod.tensorflow``, or a usage error that says what to do instead."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise usage_error(f"--backend horovod: {module} cannot be loaded ({err}); build Horovod with ./bootstrap.sh, "
                          "or train with --backend ddp (PyTorch's DistributedDataParallel)") from None


def controller_name(hvd: Any) -> str:
    """mpi or gloo: the controller the launcher set up; none for a lone process."""
    if hvd.size() == 1 and not any(k in os.environ for k in LAUNCHER_VARIABLES):
        return "none"
    if hvd.mpi_enabled():
        return "mpi"
    if hvd.gloo_enabled():
        return "gloo"
    return "none"


class _Horovod:
    """What both frameworks' Horovod modules share (same API under horovod.torch and horovod.tensorflow)."""

    name = "horovod"
    module = ""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.hvd = import_horovod(self.module)

    def start(self) -> RankInfo:
        if self.config.timeline:  # read by hvd.init(); rank 0 writes it
            timeline = Path(self.config.timeline).expanduser().resolve()
            timeline.parent.mkdir(parents=True, exist_ok=True)
            os.environ["HOROVOD_TIMELINE"] = str(timeline)
        hvd = self.hvd
        hvd.init()
        return RankInfo(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), controller_name(hvd))

    def broadcast_object(self, obj: Any, name: str) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=0, name=name)

    def allgather_object(self, obj: Any, name: str) -> list[Any]:
        return self.hvd.allgather_object(obj, name=name)

    def describe(self) -> dict[str, Any]:
        return {"communication": "horovod", "nccl": bool(self.hvd.nccl_built()), "allreduce_timing": ALLREDUCE_TIMING}

    def versions(self) -> dict[str, str]:
        import horovod

        return {"horovod": horovod.__version__}

    def close(self) -> None:
        """Nothing to do: Horovod shuts its background thread down at exit."""

    def leave(self, status: int) -> int:
        return status

    def watch(self, watchdog: Any, timeout: float) -> None:
        """Nothing to do: every Horovod wait is a call the lifecycle makes under its watchdog."""


class HorovodTorch(_Horovod):
    module = "horovod.torch"

    def begin_stop_vote(self, stop: bool) -> Any:
        import torch

        return self.hvd.allreduce_async(torch.tensor([1.0 if stop else 0.0]), op=self.hvd.Sum, name="larscale.stop")

    def end_stop_vote(self, pending: Any) -> bool:
        return self.hvd.synchronize(pending).item() > 0

    def sum(self, values: Sequence[float], name: str) -> list[float]:
        import torch

        return self.hvd.allreduce(torch.tensor(list(values), dtype=torch.float64), op=self.hvd.Sum, name=name).tolist()

    def barrier(self) -> None:
        import torch

        self.hvd.allreduce(torch.zeros(1), name="larscale.barrier")

    def torch_gradients(self, model: Any, optimizer: Any, accumulation: int) -> HorovodTorchGradients:
        return HorovodTorchGradients(self.hvd, model, optimizer, accumulation)


class HorovodTorchGradients:
    """Gradient averaging for a PyTorch model (see the module docstring)."""

    def __init__(self, hvd: Any, model: Any, optimizer: Any, accumulation: int) -> None:
        self.hvd = hvd
        self.module = model  # what forward runs on: Horovod hooks the parameters, not the module
        # hvd.DistributedOptimizer returns a new optimizer object sharing the parameter groups but with its own
        # state: from here on only this one is used (state_dict, load_state_dict, step).
        self.optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                  backward_passes_per_step=accumulation, op=hvd.Average)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # Horovod counts backward passes itself

    def backward(self, loss: Any) -> None:
        loss.backward()  # the per-parameter hooks start the allreduces

    def wait(self) -> float:
        """Block until every gradient is averaged. Returns the part of backward that waited for them: none here."""
        self.optimizer.synchronize()
        return 0.0

    @contextlib.contextmanager
    def step_context(self) -> Iterator[None]:
        with self.optimizer.skip_synchronize():
            yield

    def broadcast_parameters(self, state: dict[str, Any]) -> None:
        self.hvd.broadcast_parameters(state, root_rank=0)


class HorovodTensorFlow(_Horovod):
    module = "horovod.tensorflow"

    def __init__(self, config: TrainConfig) -> None:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Horovod needs tf.Variables (Keras 2), see README
        super().__init__(config)

    def begin_stop_vote(self, stop: bool) -> Any:
        import tensorflow as tf

        total = self.hvd.allreduce(tf.constant([1.0 if stop else 0.0]), op=self.hvd.Sum, name="larscale.stop")
        return float(total.numpy()[0])

    def end_stop_vote(self, pending: Any) -> bool:
        return pending > 0

    def sum(self, values: Sequence[float], name: str) -> list[float]:
        import tensorflow as tf

        total = self.hvd.allreduce(tf.constant(list(values), dtype=tf.float64), op=self.hvd.Sum, name=name)
        return [float(v) for v in total.numpy()]

    def barrier(self) -> None:
        import tensorflow as tf

        self.hvd.allreduce(tf.zeros(1), name="larscale.barrier")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "allreduce_timing": "hvd.grouped_allreduce after backward"}

    def average(self, grads: Sequence[Any]) -> list[Any]:
        """The ranks' mean of every gradient, one fused group (call inside a tf.function)."""
        return self.hvd.grouped_allreduce(list(grads), op=self.hvd.Average)

    def broadcast_variables(self, variables: Sequence[Any]) -> None:
        self.hvd.broadcast_variables(variables, root_rank=0)
