"""Sweep points heal themselves with the real trainer (issue #17): 2 ranks, one SIGKILLed twice after a checkpoint.

``larscale sweep submit --scheduler local --wait`` runs a 2-rank point (tiny model on digits, deterministic
kernels, a checkpoint every 20 steps); a helper kills rank 1 once a checkpoint of the first attempt exists and
again once a later checkpoint of the second attempt exists. The job script relaunches the point with
``--resume`` each time: it ends complete with 3 attempts in the manifest, and its final weights equal an
uninterrupted run's bit for bit. Under Horovod (mpirun) and torch.distributed (torchrun). A bad trainer flag
(exit 2) is not retried.

Figures (run with ``-s``), on ``FIGURES`` lines: seconds from the kill to the launcher's exit as the script saw
it, from the kill to the first step of the next attempt (training again), and the time lost per retry as the
manifest records it (jobs/attempts.py). The same helpers serve the Slurm tests (tests/test_jobs_slurm.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from jobs.attempts import read_launches, records_path
from jobs.manifest import load_manifest
from jobs.submit import submit
from jobs.sweep import plan
from larscale.runformat import read_steps, step_log_path
from scaling import checkpoint as ckpt
from tests.conftest import REPO

STEPS = 300
EVERY = 20
KILL_AFTER = (60, 160)      # checkpoint steps after which rank 1 is killed, in attempt 1 and attempt 2


def fault_spec(name: str, machine: str = "local", backend: str = "horovod", **job) -> dict:
    """One 2-rank point: LARS with warm-up and decay on the tiny model, deterministic kernels (CPU)."""
    return {
        "name": name, "model": "tiny", "framework": "torch", "dataset": "digits", "machine": machine,
        "sweep": {"kind": "strong", "nodes": [1], "ranks_per_node": 2, "global_batch": 8, "threads_per_rank": 1},
        "training": {"steps": STEPS, "optimizer": "lars", "lr": 0.2, "warmup_steps": 10, "image_size": 16,
                     "checkpoint_every": EVERY, "keep": 3, "backend": backend,
                     "extra_args": ["--deterministic", "--no-eval"]},
        "job": {"walltime": "00:15:00", "retry_backoff_s": 1, **job},
    }


def ddp_job() -> dict:
    return {"launcher": "torchrun"}


def final_weights(run_dir: Path) -> dict[str, np.ndarray]:
    import torch

    found = ckpt.latest(run_dir, load=lambda f: torch.load(f, map_location="cpu", weights_only=False))
    assert found is not None, f"no complete checkpoint in {run_dir}"
    assert found[0] == ckpt.checkpoint_path(run_dir, STEPS), found[0]
    return {k: v.numpy() for k, v in found[1]["model"].items()}


def assert_same_training(run_dir: Path, reference: Path) -> None:
    """Bit for bit the uninterrupted run's weights, and each step logged once with the same loss."""
    a, b = final_weights(reference), final_weights(run_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs from the uninterrupted run"
    for rank in (0, 1):
        straight, healed = read_steps(step_log_path(reference, rank)), read_steps(step_log_path(run_dir, rank))
        assert [r["step"] for r in healed] == list(range(STEPS))
        assert [r["loss"] for r in healed] == [r["loss"] for r in straight]


def rank_process(run_dir: Path, rank: int) -> psutil.Process | None:
    """The trainer process of ``rank`` writing into ``run_dir`` (under mpirun, srun or torchrun, ours or
    slurmstepd's): its command line names the run directory and its environment the rank."""
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE or str(run_dir) not in cmdline:
                continue
            if "scaling.train" not in cmdline or "torch.distributed.run" in cmdline:
                continue
            env = proc.environ()
            if env.get("OMPI_COMM_WORLD_RANK", env.get("RANK")) == str(rank):
                return proc
    return None


@dataclass
class Killer:
    """Kills rank 1 of the point in ``run_dir`` a few steps after checkpoint ``step``, for each step in turn, and
    times how long the next attempt takes to train again (its first step record after the kill)."""

    run_dir: Path
    output_dir: Path
    point_id: str
    steps: tuple[int, ...] = KILL_AFTER
    timeout_s: float = 400
    killed_at: list[float] = field(default_factory=list)
    training_again_s: list[float] = field(default_factory=list)
    error: str | None = None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        try:
            for number, step in enumerate(self.steps, start=1):
                self._kill_after(step, attempt=number)
                self._wait_training_again(resumed_from=step)
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.error = f"{type(err).__name__}: {err}"

    def _kill_after(self, step: int, attempt: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        path = ckpt.checkpoint_path(self.run_dir, step)
        while time.monotonic() < deadline:
            launches = read_launches(records_path(self.output_dir, self.point_id))
            # A few steps past the checkpoint: the steps after it are the work a retry redoes.
            if path.exists() and len(launches) == attempt and launches[-1].end is None and \
                    self._last_step() >= step + 2:
                victim = rank_process(self.run_dir, 1)
                if victim is not None:
                    victim.send_signal(signal.SIGKILL)
                    self.killed_at.append(time.time())
                    return
            time.sleep(0.01)
        raise TimeoutError(f"no checkpoint {step} in attempt {attempt} within {self.timeout_s} s")

    def _last_step(self) -> int:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return read_steps(step_log_path(self.run_dir, 0), validate=False)[-1]["step"]
        return -1

    def _wait_training_again(self, resumed_from: int) -> None:
        """Training again: the first step record of the next attempt (written after that attempt started, at
        or after the checkpoint it resumed from; records the killed attempt wrote late do not count)."""
        deadline = time.monotonic() + self.timeout_s
        log = step_log_path(self.run_dir, 0)
        attempt = len(self.killed_at) + 1
        while time.monotonic() < deadline:
            launches = read_launches(records_path(self.output_dir, self.point_id))
            if len(launches) >= attempt:
                with contextlib.suppress(OSError, ValueError):
                    after = [r for r in read_steps(log, validate=False)
                             if r["step"] >= resumed_from and r["time"] > launches[attempt - 1].start]
                    if after:
                        self.training_again_s.append(min(r["time"] for r in after) - self.killed_at[-1])
                        return
            time.sleep(0.05)
        raise TimeoutError("the point did not train again after the kill")


def figure(name: str, value: float, unit: str = "s") -> None:
    print(f"FIGURES {name} = {value:.2f} {unit}", flush=True)


def report_figures(label: str, killer: Killer, output_dir: Path, point_id: str) -> None:
    launches = read_launches(records_path(output_dir, point_id))
    for n, killed in enumerate(killer.killed_at):
        figure(f"{label}: kill {n + 1} -> the launcher's exit seen by the job script", launches[n].end - killed)
        figure(f"{label}: kill {n + 1} -> training again (first step of attempt {n + 2})",
               killer.training_again_s[n])
        figure(f"{label}: attempt {n + 1} time lost (manifest)", launches[n].time_lost_s or 0.0)


def reference_run(references: dict[str, Path], backend: str) -> Path:
    """The uninterrupted run of the point for ``backend``, made through the same sweep machinery on its first use
    (``references``: the session's fixture in tests/conftest.py)."""
    if backend not in references:
        job = ddp_job() if backend == "ddp" else {}
        the_plan = plan(fault_spec(f"ref-{backend}", backend=backend, **job),
                        output_dir=references["root"] / backend)
        manifest = submit(the_plan, timeout=600)
        (rec,) = manifest.points.values()
        assert rec.state == "complete" and len(rec.attempts) == 1, rec
        references[backend] = Path(rec.run_dir)
    return references[backend]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_rank_killed_twice_after_a_checkpoint_heals_bitwise(tmp_path: Path, references, backend: str) -> None:
    reference = reference_run(references, backend)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(fault_spec("heal", backend=backend,
                                                   **(ddp_job() if backend == "ddp" else {}))))
    output = tmp_path / "sweep"
    the_plan = plan(spec_path, output_dir=output)
    (point,) = the_plan.points
    killer = Killer(the_plan.run_dir(point), output, point.point_id)
    killer.start()
    cli = subprocess.run([sys.executable, "-m", "larscale", "sweep", "submit", str(spec_path), "--scheduler",
                          "local", "--wait", "--output", str(output), "--timeout", "900"],
                         capture_output=True, text=True, cwd=REPO, timeout=1000)
    log = "\n".join(p.read_text() for p in (output / "logs").glob("*.out"))
    assert killer.error is None and len(killer.killed_at) == 2, (killer, cli.stdout[-3000:], log[-6000:])
    assert cli.returncode == 0, (cli.stdout[-3000:], cli.stderr[-3000:], log[-6000:])

    rec = load_manifest(output).points[point.point_id]
    assert rec.state == "complete" and rec.exit_status == 0
    assert [(a.number, a.cause) for a in rec.attempts] == [(1, "submitted"), (2, "retry"), (3, "retry")]
    first, second, third = rec.attempts
    assert first.exit_status not in (0, 2, 75, None) and second.exit_status not in (0, 2, 75, None)
    assert third.exit_status == 0 and third.steps_reached == STEPS
    # Each retry resumed from the checkpoint the kill followed (or a later one) and got further.
    assert KILL_AFTER[0] <= first.checkpoint_step < first.steps_reached < second.steps_reached < STEPS
    assert KILL_AFTER[1] <= second.checkpoint_step
    assert first.time_lost_s > 0 and second.time_lost_s > 0 and third.time_lost_s == 0
    assert "retry 1 of 2" in log and "retry 2 of 2" in log
    # Progress within the running point, as plain lines (stdout is not a terminal here).
    assert f"{point.point_id}: step " in cli.stdout and f"/{STEPS} (" in cli.stdout, cli.stdout[-3000:]
    assert_same_training(the_plan.run_dir(point), reference)
    report_figures(f"local {backend}", killer, output, point.point_id)


@pytest.mark.slow
def test_bad_trainer_flag_is_not_retried(tmp_path: Path) -> None:
    spec = fault_spec("usage")
    spec["training"]["extra_args"] = ["--no-such-flag"]
    the_plan = plan(spec, output_dir=tmp_path / "sweep")
    manifest = submit(the_plan, timeout=300)
    (rec,) = manifest.points.values()
    log = "\n".join(p.read_text() for p in (tmp_path / "sweep" / "logs").glob("*.out"))
    assert rec.state == "failed" and rec.exit_status == 2, (rec, log)
    assert len(rec.attempts) == 1 and "exit 2 is a usage error: not retried" in rec.reason
    assert "--no-such-flag" in log and log.count("not retried") == 1
    assert not ckpt.listed(the_plan.run_dir(the_plan.points[0]))


def test_rank_process_finder_ignores_other_runs(tmp_path: Path) -> None:
    """The kill helper only ever picks a trainer of the run directory it was given."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m", "scaling.train",
                              "--out", str(tmp_path / "other")], env={**os.environ, "OMPI_COMM_WORLD_RANK": "1"})
    try:
        assert rank_process(tmp_path / "mine", 1) is None
        found = rank_process(tmp_path / "other", 1)
        assert found is not None and found.pid == other.pid
    finally:
        other.kill()
        other.wait()
