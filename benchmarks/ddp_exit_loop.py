"""Do DDP ranks always leave cleanly? Many short 2-rank ``--backend ddp`` runs, counting every exit that is not 0.

A complete run must end with exit status 0 on every rank and no ``terminate called`` (a C++ thread destroyed
while still running: SIGABRT, exit 134) in any log, however the ranks were started. Each run trains the tiny
network for a few steps on digits (a few seconds, most of it start-up), under ``torchrun`` (which hosts nothing:
rank 0 hosts the store, as larscale's launchers ask), ``mpirun`` (mpi4py broadcasts rank 0's address) or ``srun``
(a one-node Slurm started for the loop, MASTER_ADDR/MASTER_PORT exported as larscale's job scripts do).

    .venv/bin/python benchmarks/ddp_exit_loop.py --torchrun 50 --mpirun 20 --srun 20

Prints one line per run and a table per launcher; exits 1 when any run failed. Keeps the failed runs' logs
under ``--keep DIR`` (default a temporary directory, printed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scaling.launch import local_env, rank_command  # noqa: E402

TRAIN = ["-m", "scaling.train", "--backend", "ddp", "--model", "tiny", "--dataset", "digits", "--image-size", "16",
         "--batch-per-rank", "4", "--steps", "4", "--checkpoint-every", "2", "--threads", "1"]
ABORT_MARKS = ("terminate called", "Aborted", "core dumped", "Segmentation fault")


@dataclass
class Outcome:
    launcher: str
    index: int
    status: int
    seconds: float
    aborted: bool
    complete: bool

    @property
    def clean(self) -> bool:
        return self.status == 0 and not self.aborted and self.complete


def complete(out: Path) -> bool:
    summary = out / "summary.json"
    return summary.exists() and '"status": "complete"' in summary.read_text()


def run_once(launcher: str, index: int, work: Path, slurm_env: dict[str, str] | None) -> Outcome:
    out = work / f"{launcher}-{index:03d}"
    program = [*TRAIN, "--out", str(out)]
    env = local_env(threads_per_rank=1)
    if launcher == "srun":
        assert slurm_env is not None
        env.update(slurm_env)
        argv = ["srun", "--nodes=1", "--ntasks=2", "--cpus-per-task=1", "--overcommit",
                "--export=ALL", sys.executable, *program]
        env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(29600 + index % 300)
    else:
        argv = rank_command(2, [sys.executable, *program], controller="torchrun" if launcher == "torchrun" else "mpi")
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    log = proc.stdout + proc.stderr
    outcome = Outcome(launcher, index, proc.returncode, seconds, any(m in log for m in ABORT_MARKS), complete(out))
    if outcome.clean:
        shutil.rmtree(out, ignore_errors=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "launcher.log").write_text(" ".join(argv) + "\n" + log)
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torchrun", type=int, default=50, metavar="N", help="runs under torchrun (default 50)")
    parser.add_argument("--mpirun", type=int, default=20, metavar="N", help="runs under mpirun (default 20)")
    parser.add_argument("--srun", type=int, default=20, metavar="N",
                        help="runs under srun in a one-node Slurm started for the loop (default 20; 0 skips)")
    parser.add_argument("--keep", type=Path, default=None, help="where failed runs' logs stay")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="ddp-exit-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    outcomes: list[Outcome] = []
    plan = [("torchrun", args.torchrun), ("mpirun", args.mpirun), ("srun", args.srun)]
    for launcher, runs in plan:
        if runs <= 0:
            continue
        cluster = None
        if launcher == "srun":
            from tests.slurm_cluster import BINARIES, _stop, start_cluster

            if any(shutil.which(b) is None for b in BINARIES):
                print("srun: skipped (no Slurm binaries: apt-get install slurm-wlm munge)")
                continue
            cluster = start_cluster(work / "slurm", cpus=2)
        try:
            for index in range(runs):
                outcome = run_once(launcher, index, work, cluster.env if cluster else None)
                outcomes.append(outcome)
                print(f"{launcher:8s} {index:3d}  exit {outcome.status:3d}  {outcome.seconds:5.1f} s"
                      f"{'  ABORT in log' if outcome.aborted else ''}{'' if outcome.complete else '  incomplete'}",
                      flush=True)
        finally:
            if cluster is not None:
                _stop(cluster.processes)
    print(f"\n{'launcher':8s} {'runs':>5s} {'clean':>6s} {'failed':>7s} {'median s':>9s}")
    for launcher, _ in plan:
        mine = [o for o in outcomes if o.launcher == launcher]
        if mine:
            seconds = sorted(o.seconds for o in mine)[len(mine) // 2]
            clean = sum(o.clean for o in mine)
            print(f"{launcher:8s} {len(mine):5d} {clean:6d} {len(mine) - clean:7d} {seconds:9.1f}")
    failed = [o for o in outcomes if not o.clean]
    if failed:
        print(f"\nfailed runs' logs under {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
