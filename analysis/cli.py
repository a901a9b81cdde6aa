"""Subcommands of `larscale` that analysis owns (see larscale/__init__.py for the contract)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands. Handlers import heavy modules inside themselves."""
    from analysis import calibrate_cli, model_cli, report_cli, validation_cli

    model_cli.register(subparsers)  # predict, reproduce, plan, time-to-accuracy
    calibrate_cli.register(subparsers)  # calibrate (bench-comm and bench-hvd run under MPI: scaling.bench_cli)
    validation_cli.register(subparsers)  # validate (the public validation set at scale)
    report_cli.register(subparsers)  # report (sweep directories -> scaling study, calibration, allocation)
