"""Two emulated hosts on one machine: network namespaces joined by a veth pair, optionally rate-limited by tbf.

:class:`NetnsPair` creates namespaces ``lsA<tag>`` and ``lsB<tag>``, a veth pair with one end in each
(``10.<o>.77.1`` and ``.2``), an optional ``tbf`` qdisc on both ends (one rate limit per direction; this kernel
has tbf and htb, not netem), an rsh agent script that runs a command inside the namespace named as the "host",
and a hostfile with one slot per namespace, so ``ip netns exec lsA mpirun ...`` starts one rank in each. Open
MPI is forced onto TCP over the veth (``--mca btl tcp,self``, ``btl_tcp_if_include``/``oob_tcp_if_include``
the veth subnet). :meth:`NetnsPair.down` deletes both namespaces (and with them the veth pair); the pytest
fixture ``netns_pair`` always calls it. Everything needs root; the fixture skips otherwise.

Why shared/RECIPES.md saw 8 ms for 1 KiB over the veth (and 566 ms for 16 MiB at 1 Gbit/s), measured on this
machine (2-core VM, kernel 6.18 with HZ=250, Open MPI 4.1.4, mpi4py ping-pong and Allreduce, 2 ranks):

1. **Both ranks were pinned to core 0.** The recipe's ``mpirun`` line has no ``--bind-to``; Open MPI binds to
   cores by default for np <= 2, and each "host" has its own daemon, which binds *its* first rank to core 0:
   ``--report-bindings`` shows ``[B/.]`` for both ranks. Open MPI busy-polls: a rank waiting for a message spins
   until the scheduler preempts it at a tick, and only then does the peer on the same core run and answer.
   Every message costs whole ticks: the 1 KiB one-way time was 4.0, 6.0 or 8.0 ms (multiples of the 4 ms tick),
   with or without a tbf qdisc (also with plain ``pfifo`` and with no qdisc), while with the ranks on
   different cores it is 7–9 µs. Not the cause: Nagle (Open MPI sets TCP_NODELAY, ``btl_tcp_use_nagle=0``),
   delayed ACKs (their 40 ms granularity never appeared), ``tcp_autocorking`` (toggling it changed nothing
   once placement was controlled), the tbf burst. Fix: ``--bind-to none``. With the ranks unbound on a
   shared 2-core box the scheduler may still put both on one core (seen: 6 ms medians in some runs), so also
   ``--mca mpi_yield_when_idle 1``: the progress loop yields, and two ranks sharing a core exchange 1 KiB in
   16 µs instead of 6 ms (7 µs one-way when they do not share one).
2. **Open MPI's TCP BTL used half the duplex link.** With tbf 1 Gbit/s each way a 16 MiB ping-pong took
   140 ms one way (= the link) and a plain TCP socket moved 16 MiB in *both* directions at once in 139 ms, but
   the 2-rank Allreduce took 280–290 ms whatever the algorithm (``coll_tuned_allreduce_algorithm`` 2, 3, 4, 6)
   and 233 ms with 4 MiB socket buffers (``btl_tcp_sndbuf/rcvbuf``). With ``--mca btl_tcp_links 2`` (two TCP
   connections per peer pair) it takes 158–168 ms, ~90 % of the link rate (64 MiB: 600 ms vs 537 ms ideal).
   **Then a control message stuck behind a 32 MiB fragment.** Even with two links, a 64 MiB allreduce took
   580, 840 or 1140 ms call to call (link time 537 ms; steps of one 32 MiB phase, 268 ms) once Horovod was
   initialised in the process, and Horovod's own allreduce the same. The TCP BTL advertises RDMA ``put``, so
   above ``btl_tcp_min_rdma_pipeline_size`` ob1 moves a large message with the RDMA pipeline protocol, and
   ``btl_tcp_rdma_pipeline_frag_size`` is 2 GiB by default: the rest of the message is *one* put fragment,
   and a TCP endpoint sends its fragments in order. When the ranks enter the exchange a little apart
   (Horovod's background threads do), a rank's reply to its peer's request is queued behind its own 32 MiB
   put, and the peer's half starts only when that put has crossed the link: the two directions run one after
   the other. Two fixes were measured (64 MiB Horovod allreduces, 32 calls each): 256 KiB put fragments
   (``btl_tcp_rdma_pipeline_frag_size 262144``) gave 567-586 ms in 30 calls (the others ~660 ms), but in
   training the allreduces running beside the backward pass then moved at half the link rate (a receiver
   must ask for every fragment, and its progress thread shares a busy core) and 64 MiB buckets still lost a
   whole phase in 3 steps of 4 (800 ms); without ``put`` (``btl_tcp_flags send,inplace,need-ack,need-csum``:
   ob1's send pipeline, which the sender drives) the microbenchmark gave 570-594 ms and the training buckets
   took 6-27 % more than the link time (AlexNet's 67 MB fc7 in 583-620 ms, 750 ms twice in 8 steps; 151 MB
   fc6 in 1.28-1.43 s). The flags are used, with *one* link: without put, two links per peer pair hung a plain
   256 KiB ``MPI_Allreduce`` every time (Open MPI 4.1.4), and one link then runs both directions at once: a
   64 MiB mpi4py allreduce in 578-583 ms, Horovod's in 568-592 ms (one 668 in 32); in training (8 steps)
   fc8's 16 MB in 147-235 ms beside the backward pass (link 131 ms), fc7 in 569-708 ms (537), fc6 in
   1.27-1.46 s (1.21). The half-duplex allreduce above was this same stall, which two links had made rarer.
3. **tbf shape.** burst 128 KiB (as in the recipe): a 32 KiB bucket slowed the allreduce by a third
   (16 MiB 213 ms vs 158 ms); queue ``latency`` 10 or 100 ms made no difference once (2) was fixed; 20 ms is
   used (a bounded queue). Messages below the burst pass at veth speed, so the measured cost is not affine
   around the burst size: tests/test_predicted_vs_measured.py fits from twice the burst up, the range
   gradient buckets live in.
4. **Start-up flakes** seen while measuring, avoided here: the daemon in the second namespace crashed once in
   ``hwloc_shmem_topology_write`` (the rtc/hwloc component shares the topology through shared memory mapped
   at a fixed address) → ``--mca rtc ^hwloc``; a start failed with ``mkdir .../ompi.<host>.0/jf.N: File
   exists``: not a leftover but a race, both daemons seeing the same host name (network namespaces share the
   UTS name) and creating the same session directory at once → each emulated host runs in its own UTS
   namespace with its own host name (``unshare --uts``; Horovod and the trainer count nodes by host name
   too) and its own ``TMPDIR``.
5. As a precaution (not measured separately) ``net.ipv4.tcp_slow_start_after_idle=0`` in both namespaces:
   training leaves the link idle between steps for longer than the retransmission timeout, after which Linux
   would restart each step's first transfer from a small congestion window, unlike the back-to-back
   benchmark. The sysctl is per network namespace, so the host is untouched.
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
