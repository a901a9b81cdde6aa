"""Shared test helpers: start real local ranks and read what they print."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from scaling.launch import local_env, rank_command

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs of the fault tests' point, one per backend (tests/test_jobs_faults.py, reference_run):
    made once per session, for the local and the Slurm fault tests alike."""
    return {"root": tmp_path_factory.mktemp("reference")}


# Under CI (CI set, as CI services do) the fuzz tests draw the same examples every run, so a red CI names a change,
# not a draw; run locally they draw anew each time, and keep what they find in .hypothesis/ to replay.
with contextlib.suppress(ImportError):
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, database=None)
    if os.environ.get("CI"):
        _hypothesis_settings.load_profile("ci")


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


def rank_of(process: psutil.Process) -> int | None:
    try:
        env = process.environ()
    except psutil.Error:
        return None
    value = env.get("OMPI_COMM_WORLD_RANK", env.get("HOROVOD_RANK", env.get("RANK")))  # mpirun, horovodrun, torchrun
    return int(value) if value is not None else None


def rank_processes(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """Rank number → the Python process of that rank among the launcher's descendants."""
    found = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(launcher.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "python" not in os.path.basename(child.cmdline()[0]):
                    continue
                rank = rank_of(child)
                # horovodrun may interpose a Python wrapper with the same environment: keep the deepest one.
                if rank is not None and (rank not in found or child.ppid() == found[rank].pid):
                    found[rank] = child
    return found
