"""The gradient-averaging backends: which frameworks each trains and which launchers start only one of them.

The one statement of these facts; the trainer's option checks (scaling/config.py), the sweep spec's checks
(jobs/spec.py) and the launchers' (jobs/launchers.py) derive their rules and messages from it.
"""

from __future__ import annotations

from dataclasses import dataclass

# The frameworks' names as users read them in messages.
FRAMEWORK_TITLES = {"torch": "PyTorch", "tensorflow": "TensorFlow"}


@dataclass(frozen=True)
class Backend:
    """One way of averaging gradients across ranks."""

    name: str
    title: str                      # what it is, for messages
    frameworks: tuple[str, ...]     # the frameworks whose models it trains


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    # Horovod's ring-allreduce (MPI or Gloo controller, NCCL on GPUs).
    Backend("horovod", "Horovod's allreduce", ("torch", "tensorflow")),
    # PyTorch's own (gloo on CPU, NCCL on GPU), for sites where Horovod does not build.
    Backend("ddp", "PyTorch's DistributedDataParallel", ("torch",)),
)}

# Launchers that start the ranks of some backends only; every other launcher's backends are its class's
# (jobs/launchers.py). torchrun starts torch.distributed workers, never Horovod ranks.
LAUNCHER_BACKENDS: dict[str, tuple[str, ...]] = {"torchrun": ("ddp",)}


def trains(backend: str, framework: str) -> bool:
    """Whether ``backend`` can train a ``framework`` model."""
    return framework in BACKENDS[backend].frameworks


def backends_for(framework: str) -> tuple[str, ...]:
    """The backends that train ``framework`` models, in preference order."""
    return tuple(name for name, backend in BACKENDS.items() if framework in backend.frameworks)


def frameworks_title(backend: str) -> str:
    """The frameworks ``backend`` trains, as a user reads them ("PyTorch", "PyTorch or TensorFlow")."""
    return " or ".join(FRAMEWORK_TITLES[f] for f in BACKENDS[backend].frameworks)
