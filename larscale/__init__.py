"""The `larscale` command: one entry point whose subcommands come from the four packages.

Each package owns its subcommands in its ``cli.py`` through a ``register(subparsers)`` function and runs
them alone with ``python -m <package>``. Registering a subcommand must stay cheap: handlers import torch,
tensorflow or Horovod inside themselves, so ``larscale --help`` and ``larscale predict`` never load them.

A handler returns an exit status. A :class:`UsageError` raised anywhere below is the user's mistake and is
printed as one line naming the culprit, without a traceback. So is a missing part of the training stack (torch,
TensorFlow, Horovod, ...: ``pip install larscale`` plans without them): one line saying what to install.

This package is also the one shared place below the four packages (models, scaling, jobs, analysis): the files
that more than one of them reads or writes, each defined once and free of torch and TensorFlow:

- :mod:`larscale.runformat` — a training run's directory (step logs, summary.json; RUN_FORMAT.md), exit statuses;
- :mod:`larscale.machine` (+ :mod:`larscale.schema`, ``machines/``) — the machine-profile YAML;
- :mod:`larscale.benchformat` — the allreduce benchmark CSV.

Imports flow one way: ``larscale`` ← ``models`` ← ``scaling`` / ``analysis`` ← ``jobs`` (tests/test_structure.py).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

# Order is the order in `larscale --help`: from the network definitions up to the planning tools.
PACKAGES = ("models", "scaling", "jobs", "analysis")


class UsageError(Exception):
    """A bad input from the user: reported as one clear line, exit status 2."""


# Where launchers put a process's rank before any library is initialised: one table, larscale/launchenv.py.
from larscale.launchenv import RANK_VARIABLES  # noqa: E402


def launcher_rank(environ: Mapping[str, str] | None = None) -> int | None:
    """This process's rank as its launcher announced it, or None when no launcher did (a lone process)."""
    env = os.environ if environ is None else environ
    for name in RANK_VARIABLES:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def errors_once(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every rank of a job parses the same command line, so a mistake in it is printed by rank 0 alone (all exit
    2): one line per job, not one per rank."""
    def error(message: str) -> NoReturn:
        if launcher_rank() in (None, 0):
            parser.print_usage(sys.stderr)
            parser.exit(2, f"{parser.prog}: error: {message}\n")
        parser.exit(2)

    parser.error = error  # type: ignore[method-assign]
    return parser


Registrar = Callable[[argparse._SubParsersAction], None]

# The training stack, which `pip install larscale` (planning only) leaves out: import name -> what provides it.
# A handler that needs it imports it inside itself; a subcommand that launches ranks names it in
# ``set_defaults(needs=...)`` so the check comes before anything starts.
_TRAIN_EXTRA = ("pip install 'larscale[train]' -c constraints.txt --extra-index-url "
                "https://download.pytorch.org/whl/cpu (the pinned CPU torch), or ./bootstrap.sh in a checkout")
TRAINING_STACK = {
    "torch": _TRAIN_EXTRA, "tensorflow": _TRAIN_EXTRA, "tf_keras": _TRAIN_EXTRA, "mpi4py": _TRAIN_EXTRA,
    "sklearn": _TRAIN_EXTRA, "PIL": _TRAIN_EXTRA, "psutil": _TRAIN_EXTRA, "tqdm": _TRAIN_EXTRA,
    "horovod": "./bootstrap.sh builds it against this torch and MPI (or train with --backend ddp)",
}


def version() -> str:
    """The installed larscale's version ("unknown" when run from a checkout that was never installed)."""
    from importlib import metadata

    try:
        return metadata.version("larscale")
    except metadata.PackageNotFoundError:
        return "unknown"


def missing_stack(error: ModuleNotFoundError) -> str | None:
    """One line on the part of the training stack that ``error`` found missing, or None when it is something else
    (a module that is installed but failed inside, or not ours to name)."""
    top = (error.name or "").split(".")[0]
    if top not in TRAINING_STACK or importlib.util.find_spec(top) is not None:
        return None
    return f"needs {top}, which is not installed here (planning commands work without it): {TRAINING_STACK[top]}"


def report_missing_stack(prog: str, error: ModuleNotFoundError) -> int:
    """Print the one line on a missing part of the training stack (rank 0 only: every rank lacks it) and return
    exit status 2, never worth retrying; re-raise any other ModuleNotFoundError."""
    line = missing_stack(error)
    if line is None:
        raise error
    if launcher_rank() in (None, 0):
        print(f"{prog}: {line}", file=sys.stderr)
    return 2


def require_stack(modules: Sequence[str]) -> None:
    """Raise ModuleNotFoundError for the first of ``modules`` that is not installed (found without importing it)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def build_parser(packages: Sequence[str], prog: str) -> argparse.ArgumentParser:
    parser = errors_once(argparse.ArgumentParser(
        prog=prog,
        description="Large-batch CNN training at scale: train with Horovod or DDP, sweep on schedulers, "
        "model communication vs computation, plan allocations.",
    ))
    parser.add_argument("--version", action="version", version=f"larscale {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for package in packages:
        importlib.import_module(f"{package}.cli").register(subparsers)
    return parser


def run(packages: Sequence[str], argv: Sequence[str] | None = None, prog: str = "larscale") -> int:
    parser = build_parser(packages, prog)
    args = parser.parse_args(argv)
    try:
        require_stack(getattr(args, "needs", ()))
        return int(args.handler(args) or 0)
    except UsageError as err:
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        return report_missing_stack(f"{prog} {args.command}", err)
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run(PACKAGES, argv)
