"""``--threads N`` is N cores' worth of compute for every framework (issue 27).

A 1-rank CPU run with ``--threads 1`` is watched from /proc while it trains. Over the measured steps (between
two step lines of its log) the process may use at most 1.1 × the wall time in CPU time, and no more than one of
its compute threads (a thread that did at least a fifth of the process's work there) is ever runnable at the
same moment. Runnable (state R) counts a thread that waits for a core as well as one that runs, so a busy machine
does not hide a second compute thread; and a busy machine can only lower CPU time per wall second.

TensorFlow's inter-op pool used to have two threads, each running kernels of its own: a ``--threads 1`` rank
computed on two threads at once (scaling/device.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scaling.launch import local_env
from tests.conftest import REPO

# A backward pass has independent kernels (a layer's input and weight gradients) that two inter-op threads run
# side by side; the tiny network at 64 px and 32 images gives ~20 ms steps, enough for ~150 samples in 35 steps.
STEPS, FIRST_MEASURED = 40, 5
ARGS = ["--model", "tiny", "--image-size", "64", "--batch-per-rank", "32", "--steps", str(STEPS),
        "--threads", "1", "--no-eval", "--log-every", "1", "--measure-warmup-steps", str(FIRST_MEASURED)]
SAMPLE_S = 0.005
COMPUTE_SHARE = 0.2      # a thread doing this share of the process's CPU time over the window computes
CPU_PER_WALL = 1.1       # the bar
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    at: float
    threads: dict[int, tuple[str, int]]       # thread id -> (state, CPU ticks so far)


@dataclass
class Watched:
    """What /proc showed of one run: samples, and when each step line was printed."""

    samples: list[Sample] = field(default_factory=list)
    step_lines: dict[int, float] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)
    returncode: int | None = None


def read_threads(pid: int, names: dict[int, str]) -> dict[int, tuple[str, int]]:
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended between the listing and the read
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        threads[int(tid)] = (fields[0], int(fields[11]) + int(fields[12]))   # state, utime + stime
        names.setdefault(int(tid), stat[stat.index("(") + 1:stat.rindex(")")])
    return threads


def watch(argv: list[str], env: dict[str, str], timeout: float = 240) -> Watched:
    """Run ``argv``, sampling its threads every SAMPLE_S until it exits; note when each step line appears."""
    watched = Watched()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def read_output() -> None:
        for line in proc.stdout:
            watched.output.append(line)
            if line.startswith("step ") and "/" in line:
                watched.step_lines[int(line.split()[1].split("/")[0])] = time.monotonic()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            watched.samples.append(Sample(time.monotonic(), read_threads(proc.pid, watched.names)))
        except FileNotFoundError:  # exited between poll() and the read
            break
        time.sleep(SAMPLE_S)
    if proc.poll() is None:
        proc.kill()
    watched.returncode = proc.wait()
    reader.join(10)
    return watched


@dataclass
class Verdict:
    wall_s: float
    cpu_s: float
    compute_threads: list[str]
    most_runnable: int            # most compute threads runnable in one sample
    samples_over: int             # samples with more runnable compute threads than asked
    samples: int

    def describe(self) -> str:
        return (f"{self.cpu_s:.2f} s CPU in {self.wall_s:.2f} s wall ({self.cpu_s / self.wall_s:.2f}x); compute "
                f"threads {', '.join(self.compute_threads)}; up to {self.most_runnable} runnable at once, more than "
                f"1 in {self.samples_over} of {self.samples} samples")


def judge(watched: Watched, first: int, last: int) -> Verdict:
    start, end = watched.step_lines[first], watched.step_lines[last]
    window = [s for s in watched.samples if start <= s.at <= end]
    assert len(window) >= 20, f"only {len(window)} samples between step {first} and step {last}"
    before, after = window[0].threads, window[-1].threads
    used = {tid: ticks - before.get(tid, ("", 0))[1] for tid, (_, ticks) in after.items()}
    total = sum(used.values())
    compute = {tid for tid, ticks in used.items() if total and ticks >= COMPUTE_SHARE * total}
    runnable = [sum(1 for tid in compute if sample.threads.get(tid, ("", 0))[0] == "R") for sample in window]
    return Verdict(wall_s=window[-1].at - window[0].at, cpu_s=total / CLOCK_TICKS,
                   compute_threads=[f"{watched.names[tid]}:{used[tid] / CLOCK_TICKS:.2f}s" for tid in sorted(compute)],
                   most_runnable=max(runnable), samples_over=sum(1 for r in runnable if r > 1), samples=len(window))


@pytest.mark.parametrize("framework", ["tensorflow", "torch"])
def test_one_thread_is_one_core(framework: str, tmp_path: Path) -> None:
    env = local_env()
    env.pop("OMP_NUM_THREADS", None)   # --threads alone must size every pool, before the framework loads
    out = tmp_path / "run"
    watched = watch([sys.executable, "-m", "scaling.train", "--framework", framework, *ARGS, "--out", str(out)], env)
    assert watched.returncode == 0, "".join(watched.output)[-3000:]
    verdict = judge(watched, FIRST_MEASURED, STEPS)
    assert verdict.most_runnable <= 1, f"{framework} --threads 1: {verdict.describe()}"
    assert verdict.cpu_s <= CPU_PER_WALL * verdict.wall_s, f"{framework} --threads 1: {verdict.describe()}"
    pools = json.loads((out / "summary.json").read_text())["backend"]["thread_pools"]
    assert pools == {"intra_op": 1, "inter_op": 1, "openmp": 1}, pools


def test_thread_environment_is_preset_only_when_known() -> None:
    from scaling.device import cores_available, preset_thread_environment

    env: dict[str, str] = {}
    assert preset_thread_environment(3, env) == 3
    assert env == {"OMP_NUM_THREADS": "3", "TF_NUM_INTRAOP_THREADS": "3", "TF_NUM_INTEROP_THREADS": "1"}
    env = {"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}          # mpirun said how many ranks share the node
    assert preset_thread_environment(None, env) == max(1, cores_available() // 2) == int(env["OMP_NUM_THREADS"])
    env = {"OMP_NUM_THREADS": "2"}
    assert preset_thread_environment(None, env) == 2 and env["TF_NUM_INTRAOP_THREADS"] == "2"
    env = {"SLURM_PROCID": "0"}                         # srun gives no local size: cores ÷ local ranks after joining
    assert preset_thread_environment(None, env) is None and env == {"SLURM_PROCID": "0"}
