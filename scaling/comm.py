"""The communication seam of the rank lifecycle: who this rank is, and the collectives the lifecycle needs.

A communicator is built by :func:`scaling.train.build_communicator` from ``--backend`` and ``--framework``:

==========================  =======================================================================
``horovod`` + ``torch``      :class:`scaling.comm_horovod.HorovodTorch` (mpirun, srun, horovodrun)
``horovod`` + ``tensorflow`` :class:`scaling.comm_horovod.HorovodTensorFlow`
``ddp`` + ``torch``          :class:`scaling.comm_ddp.DistributedDataParallel` (torchrun, srun, mpirun)
==========================  =======================================================================

What the lifecycle (scaling/loop.py) uses is framework-neutral and listed in :class:`Communicator`. Averaging the
gradients is not: it meets the framework's model and optimizer, so each communicator also offers its framework's
hook (:class:`TorchCommunicator`'s ``torch_gradients``, which returns :class:`TorchGradients`;
:class:`TensorFlowCommunicator`'s ``average`` and ``broadcast_variables``), which the framework adapter calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from scaling.rank import RankInfo


class Communicator(Protocol):
    """The collectives of the rank lifecycle. Every call is made by all ranks, in the same order."""

    name: str  # "horovod" or "ddp": the summary's "communication"

    def start(self) -> RankInfo:
        """Join the job (the launcher said who is in it) and say who this process is."""

    def broadcast_object(self, obj: Any, name: str) -> Any:
        """Rank 0's ``obj`` on every rank (pickled)."""

    def allgather_object(self, obj: Any, name: str) -> list[Any]:
        """Every rank's ``obj``, in rank order."""

    def begin_stop_vote(self, stop: bool) -> Any:
        """Start summing the ranks' stop flags; overlaps the next step where the library allows it."""

    def end_stop_vote(self, pending: Any) -> bool:
        """Whether any rank's flag was set, from a vote begun at the previous step boundary."""

    def sum(self, values: Sequence[float], name: str) -> list[float]:
        """Element-wise sum over the ranks, in float64 (exact for counts)."""

    def barrier(self) -> None:
        """Return once every rank got here."""

    def watch(self, watchdog: Any, timeout: float) -> None:
        """Collectives the lifecycle does not call itself (DDP's, inside backward) arm ``watchdog`` for ``timeout``."""

    def describe(self) -> dict[str, Any]:
        """What the summary says of the communication (library, transport, how allreduce time is measured)."""

    def versions(self) -> dict[str, str]:
        """Library versions for the summary (e.g. Horovod's)."""

    def close(self) -> None:
        """Leave the job (after the last collective)."""

    def leave(self, status: int) -> int:
        """The rank's exit status, once its run ended normally and :meth:`close` was called (a communicator whose
        libraries cannot be torn down safely by the interpreter's exit ends the process here instead)."""



class TorchGradients(Protocol):
    """Gradient averaging for one PyTorch model, as :meth:`TorchCommunicator.torch_gradients` returns it (Horovod's
    DistributedOptimizer or DistributedDataParallel behind it)."""

    module: Any     # what forward runs on (the model, or its DDP wrapper)
    optimizer: Any  # the optimizer to step (Horovod's wraps the one it was given)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward; ``last``: the allreduce belongs to this one."""

    def backward(self, loss: Any) -> None:
        """Backward of ``loss``; the allreduces of ready gradients start inside it."""

    def wait(self) -> float:
        """Block until every gradient is averaged. Returns the seconds of backward that waited for them."""

    def step_context(self) -> contextlib.AbstractContextManager:
        """The context ``optimizer.step()`` runs in."""

    def broadcast_parameters(self, state: Mapping[str, Any]) -> None:
        """Rank 0's tensors of ``state`` (a state_dict) on every rank, in place."""


class TorchCommunicator(Communicator, Protocol):
    def torch_gradients(self, model: Any, optimizer: Any, accumulation: int) -> TorchGradients:
        """Averaging of ``model``'s gradients over the ranks, ``accumulation`` backward passes per step."""


class TensorFlowCommunicator(Communicator, Protocol):
    def average(self, grads: Sequence[Any]) -> list[Any]:
        """The ranks' mean of every gradient (inside a tf.function)."""

    def broadcast_variables(self, variables: Sequence[Any]) -> None:
        """Rank 0's values of ``variables`` on every rank."""
