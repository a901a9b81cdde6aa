"""`larscale bench-hvd`: time Horovod's own allreduce, the path a training step's gradients take.

``larscale bench-comm`` times ``MPI_Allreduce`` through mpi4py. A training step does not call that: each
gradient goes through ``hvd.allreduce_async_`` to Horovod's background thread, which negotiates readiness with
the other ranks (the controller), fuses what is ready into its fusion buffer, calls the collective and scales
the result (op=Average). The two can differ: over TCP through a rate-limited veth Horovod's path was up to 1.7×
slower than the plain allreduce between two local ranks, because its background threads enter each collective a little
apart and Open MPI's TCP put protocol then serialised the two directions (tests/netns.py; gone with ``put``
off). Whatever the cause, a model calibrated on a path the gradients do not take predicts the wrong step.

This command runs the same harness as bench-comm (:mod:`scaling.benchcomm`: warm-up, barrier-synchronised
repetitions, max over ranks, median and 95 % CI, one CSV row per size) on the operation
``horovod_allreduce``: one synchronous ``hvd.allreduce_(tensor, op=hvd.Average)`` of a float32 tensor of n
bytes, under whatever ``HOROVOD_FUSION_THRESHOLD`` / ``HOROVOD_CYCLE_TIME`` the environment sets (set them as
the training runs do). By default it also runs ``horovod_allreduce_fused`` (below) and the MPI operations
``reduce_local`` (which pins γ in ``larscale calibrate``) and ``pingpong`` (which bounds α: Horovod's short
calls measure its cycle, not the collective) in the same processes, with Horovod initialised, as during training.

``horovod_allreduce_fused`` times the same n bytes as 16 float32 tensors of one group
(``hvd.grouped_allreduce_``): Horovod copies a bucket of several tensors into its fusion buffer and back out, a
lone tensor is reduced where it lies. The difference is the copy cost ``larscale calibrate`` fits (δ,
``network.fusion_copy_gbytes_per_s``; analysis/overlap.py): 60 MiB took 37 ms alone and 54-56 ms in 16 or 64
pieces between two local ranks over shared memory. Sizes above ``HOROVOD_FUSION_THRESHOLD`` (several buffers)
are left out.

The cycle wait is part of what a back-to-back call measures: a call issued right after the previous one
completed waits for the background thread's next cycle (up to ``HOROVOD_CYCLE_TIME``). ``larscale calibrate``
subtracts the expected wait of back-to-back calls (see :func:`analysis.fit_comm.horovod_cycle_wait_s`) so that
α is the collective's own latency; the prediction adds the cycle wait of its own schedule
(:mod:`analysis.overlap`).

With ``--device cuda`` the Horovod tensors live in GPU memory, each rank on the GPU of its local rank, so the rows
time NCCL (RCCL under ROCm) over NVLink/Infinity Fabric and the NICs, where the gradients of a GPU run travel; each
timed call ends with a device synchronisation. The MPI rows (reduce_local, pingpong) stay on the host.

    mpirun -np 2 python -m larscale bench-hvd --out hvd.csv
    larscale bench-hvd --ranks 2 --out hvd.csv          # starts the ranks itself
    mpirun -np 8 python -m larscale bench-hvd --device cuda --out hvd-nccl.csv
"""

from __future__ import annotations

import os
from collections.abc import Callable

# horovod_allreduce_fused: the same bytes as FUSED_PIECES tensors of one group.
FUSED_PIECES = 16


def check_device(device: str) -> None:
    """A usage error (one line) when ``device`` is cuda and this PyTorch sees no GPU."""
    if device != "cuda":
        return
    import torch

    from larscale import UsageError

    if not torch.cuda.is_available():
        raise UsageError(f"--device cuda: this PyTorch ({torch.__version__}, CUDA {torch.version.cuda}, ROCm "
                         f"{getattr(torch.version, 'hip', None)}) sees no GPU; run on a GPU node or use --device cpu")


def horovod_factories(comm, device: str = "cpu") -> tuple[dict[str, Callable[[int], Callable[[], None]]], str]:
    """Initialise Horovod (PyTorch, on ``comm``'s ranks) and return the Horovod call factories.

    Also returns the text for the CSV's library column: Horovod's version, controller and the fusion and
    cycle settings in effect, so that a CSV says what it measured.
    """
    import horovod
    import horovod.torch as hvd
    import torch

    hvd.init(comm=comm)
    if hvd.size() != comm.Get_size():
        raise RuntimeError(f"Horovod sees {hvd.size()} ranks, MPI {comm.Get_size()}")
    torch.set_num_threads(1)
    controller = "mpi" if hvd.mpi_enabled() else "gloo"
    settings = ", ".join(f"{name}={os.environ[name]}" for name in ("HOROVOD_FUSION_THRESHOLD", "HOROVOD_CYCLE_TIME")
                         if name in os.environ) or "Horovod defaults"
    library = f"Horovod {horovod.__version__} ({controller} controller; {settings})"
    if device == "cuda":
        torch.cuda.set_device(hvd.local_rank())
        library += f"; device memory, {'NCCL' if hvd.nccl_built() else 'no NCCL: staged through the host'}"
    place = torch.device("cuda", hvd.local_rank()) if device == "cuda" else torch.device("cpu")

    expected = (hvd.size() + 1) / 2      # the mean of 1..p: exact in float32 for any p we run

    def checked(reduce: Callable[[], None], tensors: list, what: str) -> Callable[[], None]:
        """Run ``reduce`` once, check that every tensor holds the mean at both ends, and return it to be timed."""
        if device == "cuda":   # a timed call ends when the device has finished it
            run, reduce = reduce, lambda: (run(), torch.cuda.synchronize())
        reduce()
        ends = [(float(t[0]), float(t[-1])) for t in tensors]
        if any(end != (expected, expected) for end in ends):
            raise RuntimeError(f"{what} gave {ends} at the ends; expected {expected}")
        return reduce

    def horovod_allreduce(elements: int) -> Callable[[], None]:
        tensor = torch.full((elements,), float(hvd.rank() + 1), dtype=torch.float32, device=place)
        return checked(lambda: hvd.allreduce_(tensor, op=hvd.Average, name="larscale.bench_hvd"), [tensor],
                       f"Horovod allreduce of {elements} float32")

    fusion_bytes = int(os.environ.get("HOROVOD_FUSION_THRESHOLD", 64 * 2**20))

    def horovod_allreduce_fused(elements: int) -> Callable[[], None] | None:
        # FUSED_PIECES tensors in one group: fused into the buffer, copied in and out. Sizes that cannot be
        # split that way, or that overflow one buffer (the group would travel as several collectives), are
        # left out.
        if elements < FUSED_PIECES or 4 * elements > fusion_bytes:
            return None
        sizes = [elements // FUSED_PIECES] * FUSED_PIECES
        sizes[-1] += elements - sum(sizes)
        tensors = [torch.full((n,), float(hvd.rank() + 1), dtype=torch.float32, device=place) for n in sizes]
        return checked(lambda: hvd.grouped_allreduce_(tensors, op=hvd.Average, name="larscale.bench_hvd_fused"),
                       tensors, f"Horovod grouped allreduce of {elements} float32 in {FUSED_PIECES} tensors")

    return {"horovod_allreduce": horovod_allreduce, "horovod_allreduce_fused": horovod_allreduce_fused}, library
