"""The `larscale` command: every listed subcommand works, each package runs as `python -m`."""

from __future__ import annotations

import subprocess
import sys

import pytest

import larscale
from tests.conftest import REPO


def subcommands(packages) -> list[str]:
    parser = larscale.build_parser(packages, "larscale")
    action = next(a for a in parser._actions if a.dest == "command")
    return list(action.choices)


def test_help_lists_subcommands_of_every_package() -> None:
    out = subprocess.run([sys.executable, "-m", "larscale", "--help"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    for name in subcommands(larscale.PACKAGES):
        assert name in out


@pytest.mark.parametrize("package", larscale.PACKAGES)
def test_package_runs_as_module(package: str) -> None:
    proc = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for name in subcommands([package]):
        assert name in proc.stdout


def test_every_subcommand_has_working_help() -> None:
    for name in subcommands(larscale.PACKAGES):
        proc = subprocess.run([sys.executable, "-m", "larscale", name, "--help"], capture_output=True,
                              text=True, cwd=REPO)
        assert proc.returncode == 0, (name, proc.stderr)


def test_help_does_not_import_frameworks() -> None:
    code = ("import sys, larscale; larscale.build_parser(larscale.PACKAGES, 'x'); "
            "print(sorted(m for m in ('torch', 'tensorflow', 'horovod') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_ruff_passes() -> None:
    ruff = REPO / ".venv" / "bin" / "ruff"
    proc = subprocess.run([str(ruff) if ruff.exists() else "ruff", "check", "."], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
