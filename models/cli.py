"""Subcommands of `larscale` that models owns (see larscale.py for the contract)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands. Handlers import heavy modules inside themselves."""
