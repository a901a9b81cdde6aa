"""Shared test helpers: start real local ranks and read what they print."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaling.launch import local_env, rank_command

REPO = Path(__file__).resolve().parents[1]


def run_ranks(ranks: int, program: list[str], controller: str = "mpi", timeout: float = 300,
              threads_per_rank: int = 1, cwd: Path | None = None, env: dict[str, str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run ``program`` (argv after the interpreter) on ``ranks`` real local ranks."""
    argv = rank_command(ranks, [sys.executable, *program], controller=controller)
    proc = subprocess.run(argv, env=local_env(env, threads_per_rank=threads_per_rank), cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                    f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def tagged_json(stdout: str, tag: str) -> list[dict]:
    """The JSON objects printed on lines ``TAG {...}`` (one per rank, usually)."""
    return [json.loads(line.split(tag + " ", 1)[1]) for line in stdout.splitlines() if (tag + " {") in line]
