"""The framework seam of the rank lifecycle: what scaling/loop.py asks of PyTorch or TensorFlow.

A framework adapter builds the model, optimizer and data of a run, runs the pieces of a step that the lifecycle
times (forward + backward of a micro-batch, waiting for the averaged gradients, the update), and saves and restores
what a checkpoint holds. Averaging the gradients is the communicator's (scaling/comm.py); the adapter hands it the
model and optimizer. Adapters: :class:`scaling.framework_torch.TorchTraining`,
:class:`scaling.framework_tf.TensorFlowTraining`.

Clocks: the lifecycle takes a mark at every phase boundary and turns a step's marks into durations only once they
are ready. On a CPU a mark is ``time.perf_counter()`` and is ready at once, so every step is logged as it ends. On a
GPU a mark is a CUDA event recorded in the stream: reading it waits for the work before it, so a step is read once
its last event has passed (usually one step later) and the device's queue never drains for the sake of a timer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from scaling.comm import Communicator
from scaling.rank import RankInfo
from scaling.runplan import RunPlan


class Clock(Protocol):
    def mark(self) -> Any:
        """A point in time on the device's timeline."""

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds from ``start`` to ``end`` (both ready)."""

    def ready(self, mark: Any) -> bool:
        """Whether ``mark`` can be read without waiting."""

    def synchronize(self) -> None:
        """Wait until every mark taken so far is ready."""


class HostClock:
    """CPU work is done when the call returns: marks are host times, always ready."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def ready(self, mark: float) -> bool:
        return True

    def synchronize(self) -> None:
        pass


@dataclass
class DeviceSummary:
    """This rank's device as the summary reports it."""

    device: str
    threads: int
    details: dict[str, Any] = field(default_factory=dict)


class Framework(Protocol):
    name: str             # "torch" or "tensorflow"
    checkpoint_dump: Callable[[dict, BinaryIO], None]
    checkpoint_load: Callable[[BinaryIO], dict]

    def preflight(self) -> None:
        """Refuse what cannot run here (CUDA on a CPU build, a missing compiler) before joining the job."""

    def setup(self, info: RankInfo) -> DeviceSummary:
        """Device, threads, precision for this rank; before anything is built."""

    def build(self, plan: RunPlan, comm: Communicator) -> None:
        """Model, optimizer (its gradients averaged through ``comm``) and loss; identical on every rank."""

    def checkpoint_bytes(self) -> int:
        """A lower bound of one checkpoint's size (for the disk-space check at start)."""

    def restore(self, state: dict[str, Any] | None) -> None:
        """Load a checkpoint's weights and optimizer state into this rank (rank 0; others get None)."""

    def broadcast_state(self, comm: Communicator, resumed: bool) -> None:
        """Every rank takes rank 0's weights (and optimizer state when ``resumed``)."""

    def seed_rng(self, seed: int, rank: int, start_step: int) -> None:
        """Per-rank random streams for a run that has no saved ones."""

    def rng_state(self) -> Any:
        """This rank's random streams, for a checkpoint."""

    def restore_rng(self, state: Any) -> None: ...

    def data(self, plan: RunPlan, spec: Any, rank: int, ranks: int, start_step: int) -> Any:
        """This rank's batches: ``micro_batches(step)`` and ``eval_batches()``."""

    def clock(self) -> Clock: ...

    def device_scope(self) -> contextlib.AbstractContextManager:
        """The context the steps and the evaluation run in."""

    def set_lr(self, lr: float) -> None: ...

    def forward_backward(self, images: Any, labels: Any, last: bool) -> Any:
        """Loss and gradients of one micro-batch; returns the loss as the framework holds it (not read yet)."""

    def wait_gradients(self) -> float:
        """Block until the gradients are averaged over the ranks. Returns the seconds of backward that already
        waited for communication (measured by the communicator's hooks), which the log moves from compute to
        allreduce."""

    def apply(self) -> None:
        """The optimizer update with the averaged gradients; gradients cleared."""

    def loss_value(self, losses: Sequence[Any]) -> float:
        """The mean loss of a step's micro-batches as a float (reads the device)."""

    def checkpoint_payload(self) -> dict[str, Any]:
        """Weights and optimizer state to save (rank 0)."""

    def evaluate(self, batches: Iterator[tuple[Any, Any]]) -> list[float]:
        """This rank's [top-1 hits, top-5 hits, images] over its evaluation shard."""

    def describe(self) -> dict[str, Any]:
        """What the summary's ``backend`` says of the device and of the compiled model."""

    def versions(self) -> dict[str, str]: ...

