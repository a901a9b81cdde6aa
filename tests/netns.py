"""Two emulated hosts on one machine: network namespaces joined by a veth pair, optionally rate-limited by tbf.

:class:`NetnsPair` creates namespaces ``lsA<tag>`` and ``lsB<tag>``, a veth pair with one end in each
(``10.<o>.77.1`` and ``.2``), an optional ``tbf`` qdisc on both ends (one rate limit per direction; tbf, because
not every kernel has netem), an rsh agent script that runs a command inside the namespace named as the "host",
and a hostfile with one slot per namespace, so ``ip netns exec lsA mpirun ...`` starts one rank in each. Open
MPI is forced onto TCP over the veth (``--mca btl tcp,self``, ``btl_tcp_if_include``/``oob_tcp_if_include``
the veth subnet). :meth:`NetnsPair.down` deletes both namespaces (and with them the veth pair); the pytest
fixture ``netns_pair`` always calls it. Everything needs root; the fixture skips otherwise.

Why each Open MPI and tc setting (the measurements behind them: benchmarks/README.md, "Measurement history"):

1. ``--bind-to none`` and ``--mca mpi_yield_when_idle 1``: each emulated host has its own daemon, which binds
   *its* first rank to core 0, and Open MPI busy-polls, so two ranks on one core answer each other only at
   scheduler ticks (milliseconds per message instead of microseconds). Unbound ranks may still share a core on
   a small machine; yielding in the progress loop keeps that cheap.
2. ``btl_tcp_flags send,inplace,need-ack,need-csum`` (no RDMA ``put``) with one TCP link: with ``put``, ob1
   moves the rest of a large message as one fragment (``btl_tcp_rdma_pipeline_frag_size`` is 2 GiB), and a
   rank's reply to its peer queues behind that fragment, so the allreduce's two directions run one after the
   other. Without ``put``, two links per peer pair hang ``MPI_Allreduce`` (Open MPI 4.1.4).
3. tbf: messages below the burst pass at veth speed, so the cost is not affine around the burst size
   (tests/test_predicted_vs_measured.py fits from twice the burst up); a 20 ms queue ``latency`` bounds the
   queue.
4. ``--mca rtc ^hwloc``, and each host in its own UTS namespace (``unshare --uts``) with its own ``TMPDIR``:
   the hwloc component shares the topology through shared memory at a fixed address (a daemon crashed in
   ``hwloc_shmem_topology_write``), and namespaces share the host name, so two daemons would race to create
   one session directory (and Horovod and the trainer count nodes by host name).
5. ``net.ipv4.tcp_slow_start_after_idle=0`` in both namespaces (a precaution): training leaves the link idle
   between steps for longer than the retransmission timeout, after which Linux would restart each step's first
   transfer from a small congestion window. The sysctl is per network namespace, so the host is untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Open MPI options for ranks on the emulated hosts, each one explained in the module docstring.
TUNED_MCA = ("--bind-to", "none", "--mca", "mpi_yield_when_idle", "1",
             "--mca", "btl_tcp_flags", "send,inplace,need-ack,need-csum", "--mca", "rtc", "^hwloc")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_available() -> str | None:
    """None when this process can create namespaces, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "mpirun"):
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH"
    return None


@dataclass
class NetnsPair:
    """Namespaces ``host_a`` and ``host_b`` with addresses ``.1`` and ``.2`` of :attr:`subnet` on a veth pair."""

    workdir: Path
    rate_mbit: float | None = None          # tbf rate each way; None: no limit
    burst_bytes: int = 128 * 1024           # tbf bucket
    tbf_latency_ms: float = 20.0            # longest wait in the tbf queue before a drop (bounds the queue)
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    octet: int = field(default_factory=lambda: 64 + os.getpid() % 128)

    @property
    def host_a(self) -> str:
        return f"lsA{self.tag}"

    @property
    def host_b(self) -> str:
        return f"lsB{self.tag}"

    @property
    def subnet(self) -> str:
        return f"10.{self.octet}.77.0/24"

    def address(self, host: str) -> str:
        return f"10.{self.octet}.77.{1 if host == self.host_a else 2}"

    @property
    def agent(self) -> Path:
        return self.workdir / "netns-rsh"

    @property
    def hostfile(self) -> Path:
        return self.workdir / "hostfile"

    def tmpdir(self, host: str) -> Path:
        """Per-host TMPDIR: Open MPI's session directories would otherwise collide (same host name)."""
        return self.workdir / f"tmp-{host}"

    def up(self) -> NetnsPair:
        self.down()
        a, b = self.host_a, self.host_b
        try:
            _ip("netns", "add", a)
            _ip("netns", "add", b)
            veth_a, veth_b = f"vA{self.tag}", f"vB{self.tag}"
            _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
            _ip("link", "set", veth_a, "netns", a)
            _ip("link", "set", veth_b, "netns", b)
            for host, dev in ((a, veth_a), (b, veth_b)):
                inside = ("ip", "netns", "exec", host)
                _ip("netns", "exec", host, "ip", "addr", "add", f"{self.address(host)}/24", "dev", dev)
                _ip("netns", "exec", host, "ip", "link", "set", "lo", "up")
                _ip("netns", "exec", host, "ip", "link", "set", dev, "up")
                subprocess.run([*inside, "sysctl", "-q", "net.ipv4.tcp_slow_start_after_idle=0"], check=True,
                               capture_output=True)
                if self.rate_mbit is not None:
                    subprocess.run([*inside, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                                    "rate", f"{self.rate_mbit:g}mbit", "burst", str(self.burst_bytes),
                                    "latency", f"{self.tbf_latency_ms:g}ms"], check=True, capture_output=True)
        except subprocess.CalledProcessError as err:
            self.down()
            raise RuntimeError(f"netns set-up failed: {' '.join(err.cmd)}: {err.stderr}") from None
        self.workdir.mkdir(parents=True, exist_ok=True)
        for host in (a, b):
            self.tmpdir(host).mkdir(exist_ok=True)
        # The agent "logs in" to the namespace named as the host, with that host name (its own UTS namespace)
        # and its own TMPDIR: two hosts that share a name look like one node to Horovod and to Open MPI.
        self.agent.write_text('#!/bin/sh\n# Open MPI rsh agent for the emulated hosts of tests/netns.py.\n'
                              'host=$1; shift\n'
                              f'exec ip netns exec "$host" unshare --uts env TMPDIR="{self.workdir}/tmp-$host" '
                              '/bin/sh -c "hostname $host && $*"\n')
        self.agent.chmod(0o755)
        self.hostfile.write_text(f"{a} slots=1\n{b} slots=1\n")
        return self

    def down(self) -> None:
        for host in (self.host_a, self.host_b):
            _ip("netns", "del", host, check=False)   # deleting a namespace deletes its veth end and the pair

    def exists(self) -> bool:
        names = _ip("netns", "list", check=False).stdout.split()
        return self.host_a in names or self.host_b in names

    def mca(self, tuned: bool = True) -> list[str]:
        """Open MPI options: one rank per namespace, TCP over the veth; ``tuned`` adds :data:`TUNED_MCA`."""
        base = ["--hostfile", str(self.hostfile), "--mca", "plm_rsh_agent", str(self.agent),
                "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", self.subnet,
                "--mca", "oob_tcp_if_include", self.subnet]
        return base + (list(TUNED_MCA) if tuned else [])

    def mpirun(self, program: Sequence[str], ranks: int = 2, extra: Sequence[str] = (),
               tuned: bool = True) -> list[str]:
        """argv that runs ``program`` on ``ranks`` ranks spread over the two namespaces."""
        return ["ip", "netns", "exec", self.host_a, "unshare", "--uts", "/bin/sh", "-c",
                f'hostname {self.host_a} && exec "$0" "$@"', "env", f"TMPDIR={self.tmpdir(self.host_a)}",
                "mpirun", "-np", str(ranks), *self.mca(tuned), *extra, *program]


@pytest.fixture
def netns_pair(tmp_path: Path) -> Iterator[NetnsPair]:
    """An unlimited veth pair; set ``rate_mbit`` and call ``up()`` again for a rate-limited one."""
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    pair = NetnsPair(tmp_path / "netns")
    try:
        yield pair.up()
    finally:
        pair.down()
