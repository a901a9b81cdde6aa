"""A real one-node Slurm for tests: munged, slurmctld and slurmd with every file in a scratch directory.

Import the fixture from a test module (``from tests.slurm_cluster import slurm_cluster``). It starts the three
daemons in the foreground as our children (so we hold their pids), on free TCP ports and a private munge
socket (nothing collides with another Slurm or munge on the machine), waits until ``sinfo`` shows the node
idle, points ``SLURM_CONF`` at its configuration for the tests, and at teardown stops the daemons and waits
for them: nothing is left running. Tests that use it are skipped when the Slurm or munge binaries are absent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")
MUNGE_KEY = Path("/etc/munge/munge.key")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    """A running one-node cluster: ``env`` is what a Slurm client command needs."""

    root: Path
    conf: Path
    node: str
    cpus: int
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, argv: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def job_state(self, job_id: str) -> tuple[str, str]:
        """(JobState, ExitCode) of a job the controller still remembers (MinJobAge keeps finished ones)."""
        out = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
        return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "")

    def wait_job(self, job_id: str, timeout: float = 300) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state, code = self.job_state(job_id)
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED"):
                return state, code
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("ctld.log", "d.log", "munged.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} ---\n" + path.read_text()[-3000:])
        return "\n".join(parts)


def _config(root: Path, node: str, cpus: int, ctld_port: int, d_port: int, munge_socket: Path, gpus: int = 0) -> str:
    # GPUs as generic resources that Slurm schedules and accounts; nothing binds them (TaskPlugin=task/none).
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    return f"""\
{"GresTypes=gpu" if gpus else ""}
ClusterName=larscaletest
SlurmctldHost={node}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/ctld.log
SlurmdLogFile={root}/d.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={node} CPUs={cpus} RealMemory=4000{gres} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE OverSubscribe=NO State=UP
"""


def _stop(processes: dict[str, subprocess.Popen]) -> None:
    # Reverse start order: slurmd, slurmctld, munged. SIGTERM, then SIGKILL if a daemon lingers.
    for name in reversed(list(processes)):
        proc = processes[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def start_cluster(root: Path, cpus: int | None = None, ready_timeout: float = 60, gpus: int = 0) -> SlurmCluster:
    if os.geteuid() != 0:
        # slurmd runs as root (SlurmUser=root) and munged reads the root-only key: a user cannot start this Slurm.
        pytest.skip(f"no Slurm can be started without root (uid {os.geteuid()}): the Slurm tests are skipped")
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing or not MUNGE_KEY.exists():
        pytest.skip(f"Slurm/munge not installed (missing: {', '.join(missing) or MUNGE_KEY})")
    node = socket.gethostname().split(".")[0]
    cpus = cpus or os.cpu_count() or 1
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    munge_socket = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(_config(root, node, cpus, _free_port(), _free_port(), munge_socket, gpus))
    if gpus:
        # slurmd 22.05 reports 0 GPUs for a record without File= (Count= alone, or Flags=CountOnly), and it stats
        # each file: stand-in character devices, one per GPU, make a node of N GPUs where none exists.
        stand_ins = ("/dev/zero", "/dev/null", "/dev/full", "/dev/random", "/dev/urandom")[:gpus]
        (root / "gres.conf").write_text(f"AutoDetect=off\nNodeName={node} Name=gpu File={','.join(stand_ins)}\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(root=root, conf=conf, node=node, cpus=cpus, env=env)
    try:
        cluster.processes["munged"] = subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={MUNGE_KEY}",
             f"--pid-file={root / 'munge' / 'munged.pid'}", f"--seed-file={root / 'munge' / 'seed'}",
             f"--log-file={root / 'munged.log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
        _wait_for(lambda: munge_socket.exists(), 20, "munged socket", cluster)
        cluster.processes["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
        cluster.processes["slurmd"] = subprocess.Popen(
            ["slurmd", "-D", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)

        def node_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            return out.returncode == 0 and out.stdout.strip().startswith("idle")

        _wait_for(node_idle, ready_timeout, "node idle", cluster)
    except BaseException:
        _stop(cluster.processes)
        raise
    return cluster


def _wait_for(ready, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode} while waiting for {what}\n{cluster.logs()}")
        if ready():
            return
        time.sleep(0.3)
    raise TimeoutError(f"no {what} after {timeout:.0f} s\n{cluster.logs()}")


@contextlib.contextmanager
def running_cluster(root: Path, gpus: int = 0) -> Iterator[SlurmCluster]:
    """A cluster that ``SLURM_CONF`` points at while it runs; its jobs are cancelled and its daemons stopped after."""
    cluster = start_cluster(root, gpus=gpus)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        # Cancel whatever is left so slurmd does not leave job processes behind, then stop the daemons.
        subprocess.run(["scancel", "--full", "--user", "root"], env=cluster.env, capture_output=True, timeout=30)
        _stop(cluster.processes)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A one-node Slurm for the tests of one module."""
    with running_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def slurm_gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A one-node Slurm whose node has 4 GPUs as count-only GRES (no devices: jobs are scheduled, not bound)."""
    with running_cluster(tmp_path_factory.mktemp("slurm-gpu"), gpus=4) as cluster:
        yield cluster
