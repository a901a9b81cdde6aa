"""The emulated two-host network (tests/netns.py): set-up, teardown, and the rank placement it fixes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaling.launch import local_env
from tests.conftest import REPO, tagged_json
from tests.netns import NetnsPair, netns_available, netns_pair  # noqa: F401  (fixture)

pytestmark = pytest.mark.netns

# One write(2) per line: two ranks printing at once must not interleave.
PLACEMENT = ("import json, os, socket; from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "os.write(1, ('PLACE ' + json.dumps({'rank': c.Get_rank(), 'cpus': sorted(os.sched_getaffinity(0)), "
             "'netns': os.readlink('/proc/self/ns/net'), 'host': socket.gethostname()}) + chr(10)).encode())")


def test_pair_is_created_rate_limited_and_removed(tmp_path: Path) -> None:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    pair = NetnsPair(tmp_path / "ns", rate_mbit=500)
    try:
        pair.up()
        assert pair.exists()
        for host in (pair.host_a, pair.host_b):
            addresses = subprocess.run(["ip", "netns", "exec", host, "ip", "-o", "addr"], capture_output=True,
                                       text=True, check=True).stdout
            assert pair.address(host) in addresses
            qdisc = subprocess.run(["ip", "netns", "exec", host, "tc", "qdisc", "show"], capture_output=True,
                                   text=True, check=True).stdout
            assert "tbf" in qdisc and "500Mbit" in qdisc
        assert pair.agent.stat().st_mode & 0o111 and "slots=1" in pair.hostfile.read_text()
    finally:
        pair.down()
    assert not pair.exists()


def _placements(argv: list[str]) -> list[dict]:
    proc = subprocess.run(argv, capture_output=True, text=True, env=local_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted(tagged_json(proc.stdout, "PLACE"), key=lambda r: r["rank"])


def test_one_rank_per_namespace_and_the_default_binding_that_cost_8_ms(netns_pair: NetnsPair) -> None:  # noqa: F811
    program = [sys.executable, "-c", PLACEMENT]
    tuned = _placements(netns_pair.mpirun(program))
    assert [r["rank"] for r in tuned] == [0, 1]
    assert tuned[0]["netns"] != tuned[1]["netns"]               # two "hosts", each with its own name
    assert [r["host"] for r in tuned] == [netns_pair.host_a, netns_pair.host_b]
    # Unbound: each rank may run on any core of the machine.
    assert tuned[0]["cpus"] == tuned[1]["cpus"]
    # Open MPI's default placement binds each host's first rank to its first core: on one machine both ranks
    # share core 0 and every message waits for a scheduler tick (the recipe's 8 ms; see tests/netns.py).
    untuned = _placements(netns_pair.mpirun(program, tuned=False))
    if len(tuned[0]["cpus"]) > 1:
        assert untuned[0]["cpus"] == untuned[1]["cpus"] == [untuned[0]["cpus"][0]]


def test_bench_comm_runs_over_the_veth(netns_pair: NetnsPair, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "veth.csv"
    argv = netns_pair.mpirun([sys.executable, "-m", "larscale", "bench-comm", "--max-bytes", "1M", "--factor", "16",
                              "--repetitions", "3", "--warmup", "1", "--max-seconds-per-size", "1",
                              "--label", "veth", "--out", str(out)])
    proc = subprocess.run(argv, capture_output=True, text=True, env=local_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from larscale.benchformat import read_csv

    rows = read_csv(out)
    assert {r["nodes"] for r in rows} == {2} and {r["ranks"] for r in rows} == {2}   # as Open MPI sees it
    assert {r["operation"] for r in rows} == {"allreduce", "pingpong", "reduce_local"}
    assert json.dumps(rows)  # plain values only
