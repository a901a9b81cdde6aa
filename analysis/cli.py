"""Subcommands of `larscale` that analysis owns (see larscale.py for the contract)."""

from __future__ import annotations

import argparse
import importlib.util


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands. Handlers import heavy modules inside themselves."""
    from analysis import model_cli

    model_cli.register(subparsers)  # predict, reproduce, plan, time-to-accuracy
    if importlib.util.find_spec("analysis.calibrate_cli") is not None:
        __import__("analysis.calibrate_cli", fromlist=["register"]).register(subparsers)  # bench-comm, calibrate
