"""Data-parallel training, measured step by step: ``larscale train`` / ``python -m scaling.train``.

Every rank runs this program (``mpirun``, ``srun``, ``horovodrun`` or ``torchrun`` start them; alone it is a 1-rank
run). Gradients are averaged by Horovod (``--backend horovod``, the default: MPI or Gloo controller, whichever the
launcher set up) or by PyTorch's DistributedDataParallel (``--backend ddp``). PyTorch by default, ``--framework
tensorflow`` for TensorFlow 2 (Horovod only).

Batch arithmetic: ``global_batch = batch_per_rank × ranks × accumulation``; give either side, and both only when
they agree. One step is one optimizer update on ``global_batch`` images.

The modules behind it: scaling/config.py (options), scaling/runplan.py (batch, length, LR schedule),
scaling/rank.py (start-up, stop flag, watchdog), scaling/loop.py (the lifecycle every run goes through),
scaling/framework_torch.py and scaling/framework_tf.py (the frameworks), scaling/comm_horovod.py and
scaling/comm_ddp.py (the communication backends), scaling/summary.py (summary.json). What a run writes:
larscale/RUN_FORMAT.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from larscale import launcher_rank
from scaling.config import TrainConfig, add_arguments, check_config, config_from_args
from scaling.rank import StopFlag
from scaling.runplan import check_output_dir

if TYPE_CHECKING:
    from scaling.comm import Communicator
    from scaling.framework import Framework


def preset_threads(config: TrainConfig) -> None:
    """Size the frameworks' thread pools in the environment, which they read only when they load (before then)."""
    from scaling.config import usage_error
    from scaling.device import DeviceError, preset_thread_environment

    try:
        preset_thread_environment(config.threads)
    except DeviceError as err:
        raise usage_error(str(err)) from None


def build_framework(config: TrainConfig) -> Framework:
    """The framework adapter for ``--framework`` (imports the framework only when chosen)."""
    if config.framework == "tensorflow":
        from scaling.framework_tf import TensorFlowTraining

        return TensorFlowTraining(config)
    from scaling.framework_torch import TorchTraining

    return TorchTraining(config)


def build_communicator(config: TrainConfig) -> Communicator:
    """The communicator for ``--backend`` and ``--framework`` (imports the library only when chosen)."""
    if config.backend == "ddp":
        from scaling.comm_ddp import DistributedDataParallel

        return DistributedDataParallel(config)
    from scaling.comm_horovod import HorovodTensorFlow, HorovodTorch

    return HorovodTensorFlow(config) if config.framework == "tensorflow" else HorovodTorch(config)


def run(args: argparse.Namespace) -> int:
    """Handler of ``larscale train``: validate, build the framework and the communicator, run. Returns the status."""
    # First of all, before torch, TensorFlow or Horovod load (seconds): a scheduler's stop signal that comes during
    # start-up must ask for a stop, not kill the rank (SIGUSR1's default action) and leave its peers hanging.
    stop = StopFlag().install()
    try:
        return _run(args, stop)
    finally:
        stop.restore()


def _run(args: argparse.Namespace, stop: StopFlag) -> int:
    from scaling.loop import run_rank

    config = config_from_args(args)
    check_config(config)
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restarts not in ("", "0") and not config.resume:
        # torchrun restarted the workers after one failed: continue from the newest checkpoint, not from step 0.
        config.resume = True
        if launcher_rank() in (None, 0):
            print(f"larscale train: torchrun restart {restarts}: resuming from the newest checkpoint", flush=True)
    check_output_dir(config.out)
    preset_threads(config)
    framework = build_framework(config)
    comm = build_communicator(config)
    try:
        status = run_rank(config, framework, comm, stop)
    finally:
        del framework  # its model may hold the communicator's resources (DDP's process group): let go of them first
        comm.close()
    return comm.leave(status)


def build_parser(prog: str = "python -m scaling.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    return add_arguments(parser)


def report_usage_error(prog: str, err: Exception) -> None:
    """One line per job: rank 0 prints the mistake every rank found; a rank's own problem is printed where it is."""
    if getattr(err, "every_rank", False) or launcher_rank() in (None, 0):
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from larscale import UsageError, report_missing_stack
    from larscale.runformat import EXIT_USAGE

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        report_usage_error("larscale train", err)
        return EXIT_USAGE
    except ModuleNotFoundError as err:  # a job script's ranks on a node without torch: one line, no traceback
        return report_missing_stack("larscale train", err)


if __name__ == "__main__":
    sys.exit(main())
