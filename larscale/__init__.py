"""The `larscale` command: one entry point whose subcommands come from the four packages.

Each package owns its subcommands in its ``cli.py`` through a ``register(subparsers)`` function and runs
them alone with ``python -m <package>``. Registering a subcommand must stay cheap: handlers import torch,
tensorflow or Horovod inside themselves, so ``larscale --help`` and ``larscale predict`` never load them.

A handler returns an exit status. A :class:`UsageError` raised anywhere below is the user's mistake and is
printed as one line naming the culprit, without a traceback.

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


def build_parser(packages: Sequence[str], prog: str) -> argparse.ArgumentParser:
    parser = errors_once(argparse.ArgumentParser(
        prog=prog,
        description="Large-batch CNN training at scale: train with Horovod or DDP, sweep on schedulers, "
        "model communication vs computation, plan allocations.",
    ))
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for package in packages:
        importlib.import_module(f"{package}.cli").register(subparsers)
    return parser


def run(packages: Sequence[str], argv: Sequence[str] | None = None, prog: str = "larscale") -> int:
    parser = build_parser(packages, prog)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UsageError as err:
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run(PACKAGES, argv)
