"""The rank lifecycle of ``larscale train``, written once for every framework and communicator.

Every rank runs :func:`run_rank`; what differs between PyTorch and TensorFlow is behind the framework adapter
(scaling/framework.py), what differs between Horovod and torch.distributed behind the communicator
(scaling/comm.py). In order:

1. start: join the job, set up the device, start the watchdog and the stop flag (scaling/rank.py);
2. plan the run (scaling/runplan.py) and build model, optimizer and data;
3. resume header: rank 0 finds the newest complete checkpoint (``--resume``) and checks that the run's checkpoints
   fit on the disk; everyone learns both from one broadcast, and all refuse together when they do not fit;
4. weights (and, on a resume, optimizer state) broadcast from rank 0; random streams restored per rank when the
   rank count is unchanged, else seeded from (seed, rank, step);
5. the steps (:class:`Steps`; the body of one is :func:`train_step`), each timed in phases (below), logged, and
   followed by the stop vote and the checkpoint cadence;
6. :func:`finish_rank`, one routine for the three exits: the final checkpoint, the evaluation, the summary; exit 0
   complete, 75 stopped by a signal, 1 failed.

A step, per rank, in phases (seconds, written to ``steps/rank-NNNNN.jsonl``): ``data_s`` waiting for the batch,
``compute_s`` forward + backward (the allreduces of ready gradients start inside backward and overlap with it),
``allreduce_s`` waiting for the averaged gradients after backward, ``optimizer_s`` the update, and ``step_s`` the
whole boundary-to-boundary time (the ``step_s`` add up to the wall time of the loop, checkpoints excepted). The
phases are read from the framework's clock (host times on CPU; CUDA events on GPU, read once ready, see
scaling/framework.py).

Stop agreement: SIGTERM and SIGUSR1 set a local flag; at every step boundary the ranks sum their flags with a vote
begun one step earlier (so it overlaps a step), and all stop at the same boundary: checkpoint, summary with status
"interrupted", exit 75.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from larscale.runformat import EXIT_COMPLETE, EXIT_FAILED, EXIT_RESUMABLE, StepLog
from scaling import checkpoint as ckpt
from scaling.comm import Communicator
from scaling.config import TrainConfig, usage_error
from scaling.framework import Clock, Framework
from scaling.rank import RankStart, StopFlag, log, start_rank
from scaling.runplan import RunPlan, checkpoints_planned, dataset_facts, make_plan, train_set_size
from scaling.summary import Progress, StepTimes, build_summary, write_summary


class StopRequested(Exception):
    """All ranks agreed to stop at this step boundary (a rank received SIGTERM or SIGUSR1)."""


@dataclass
class StepMarks:
    """One step's clock marks and losses, kept until its marks can be read."""

    step: int
    epoch: int
    lr: float
    boundary: Any
    micro: list[tuple[Any, Any]] = field(default_factory=list)  # (batch ready, backward done) per micro-batch
    reduced: Any = None
    applied: Any = None
    end: Any = None
    losses: list[Any] = field(default_factory=list)
    hidden_wait_s: float = 0.0  # seconds of backward that waited for communication (the communicator's hooks say)
    wall_time: float = 0.0


def step_record(marks: StepMarks, clock: Any, loss: float, rank: int, ranks: int, plan: RunPlan) -> dict[str, Any]:
    """The step-log record of a step whose marks are ready (see larscale/RUN_FORMAT.md)."""
    seconds = clock.seconds
    data_s = compute_s = 0.0
    previous = marks.boundary
    for ready, done in marks.micro:
        data_s += seconds(previous, ready)
        compute_s += seconds(ready, done)
        previous = done
    moved = min(marks.hidden_wait_s, compute_s)
    step_s = seconds(marks.boundary, marks.end)
    b = plan.batch
    return {
        "step": marks.step, "epoch": marks.epoch, "rank": rank, "ranks": ranks,
        "batch_per_rank": b.batch_per_rank, "global_batch": b.global_batch,
        "data_s": data_s, "compute_s": compute_s - moved, "allreduce_s": seconds(previous, marks.reduced) + moved,
        "optimizer_s": seconds(marks.reduced, marks.applied), "step_s": step_s,
        "images_per_s": b.batch_per_rank * b.accumulation / step_s if step_s > 0 else 0.0,
        "lr": marks.lr, "loss": loss, "time": marks.wall_time,
    }


@dataclass
class Run:
    """What the lifecycle's helpers share for one rank's run."""

    config: TrainConfig
    framework: Framework
    comm: Communicator
    start: RankStart
    plan: RunPlan
    dataset_name: str
    resumed_from: str | None = None
    last_checkpoint: str | None = None
    times: StepTimes = field(default_factory=StepTimes)

    @property
    def rank(self) -> int:
        return self.start.info.rank

    @property
    def ranks(self) -> int:
        return self.start.info.ranks

    @property
    def first_step_timeout(self) -> float:
        """A peer may still be compiling its first step (tf.function tracing; torch.compile takes minutes): the
        collectives of this process's first step wait as long as start-up ones, longer with --compile."""
        return max(self.start.startup_timeout, 1800.0) if self.config.compile else self.start.startup_timeout

    def waiting(self, what: str, startup: bool = False,
                timeout: float | None = None) -> contextlib.AbstractContextManager:
        if timeout is None:
            timeout = self.start.startup_timeout if startup else self.config.stall_timeout
        return self.start.watchdog.waiting(what, timeout)

    def save_checkpoint(self, step: int) -> None:
        """Every rank's random streams to rank 0, which writes the checkpoint atomically."""
        with self.waiting("checkpoint RNG gather"):
            rng_states = self.comm.allgather_object(self.framework.rng_state(), name="larscale.rng")
        if self.rank != 0:
            return
        plan = self.plan
        payload = {**self.framework.checkpoint_payload(), "schedule_step": step,
                   "epoch": step // plan.steps_per_epoch, "position_in_epoch": step % plan.steps_per_epoch,
                   "rng_per_rank": rng_states, "ranks": self.ranks, "config": asdict(self.config),
                   "framework": self.config.framework, "backend": self.config.backend,
                   "lr_next": plan.lr_at(step) if step < plan.total_steps else None}
        path = ckpt.save(self.config.out, step, payload, self.config.keep, dump=self.framework.checkpoint_dump)
        self.last_checkpoint = str(path)

    def summary(self, status: str, step: int, all_times: list[StepTimes], evaluation: dict | None) -> dict:
        s, device = self.start, self.start.device
        versions = {**base_versions(), **self.framework.versions(), **self.comm.versions()}
        details = {"threads_per_rank": device.threads, "device": device.device, **device.details,
                   **self.framework.describe(), **self.comm.describe()}  # the summary's "backend" field
        return build_summary(self.config, self.plan, status, s.info, s.hosts, s.local_sizes, all_times, step,
                             device.threads, versions, s.started_at, self.last_checkpoint, evaluation,
                             self.dataset_name, extra={"communication": self.comm.name, "backend": details,
                                                       "resumed_from": self.resumed_from})

    def finish(self, status: str, step: int, evaluation: dict | None) -> None:
        with self.waiting("summary gather"):
            gathered = self.comm.allgather_object(self.times, name="larscale.summary")
        if self.rank == 0:
            write_summary(self.config.out, self.summary(status, step, gathered, evaluation))


def base_versions() -> dict[str, str]:
    import platform

    return {"python": platform.python_version()}


def resume_header(run: Run) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Rank 0's newest complete checkpoint (when resuming) and the disk-space verdict, known to every rank."""
    config, framework = run.config, run.framework
    state = None
    refuse = None
    if run.rank == 0:
        if config.resume:
            found = ckpt.latest(config.out, load=framework.checkpoint_load)
            if found is not None:
                run.resumed_from, state = str(found[0]), found[1]
                saved_framework = state.get("framework", "torch")
                if saved_framework != config.framework:
                    refuse = (f"{config.out}: holds a {saved_framework} checkpoint ({run.resumed_from}); resume it "
                              f"with --framework {saved_framework}, or choose another --out")
        # Rank 0 writes the checkpoints: it checks now that they fit, and every rank stops together if not.
        refuse = refuse or ckpt.space_problem(
            config.out, framework.checkpoint_bytes(), config.keep,
            checkpoints_planned(config.checkpoint_every, state["step"] if state else 0, run.plan.total_steps))
    with run.waiting("resume broadcast", startup=True):
        header = run.comm.broadcast_object(
            {"step": state["step"] if state else 0, "path": run.resumed_from,
             "rng": state.get("rng_per_rank") if state else None, "ranks": state["ranks"] if state else None,
             "refuse": refuse}, name="larscale.resume")
    if header["refuse"]:
        raise usage_error(f"--out {header['refuse']}")
    return header, state


def train_step(run: Run, data: Any, clock: Clock, step: int, boundary: Any, timeout: float) -> StepMarks:
    """One optimizer step: the micro-batches' forward and backward, the wait for the averaged gradients, the update,
    each phase between two clock marks. ``boundary`` is the mark the step starts from."""
    plan, framework = run.plan, run.framework
    run.comm.watch(run.start.watchdog, timeout)
    marks = StepMarks(step, step // plan.steps_per_epoch, plan.lr_at(step), boundary)
    framework.set_lr(marks.lr)
    batches = data.micro_batches(step)
    accumulation = plan.batch.accumulation
    for micro in range(accumulation):
        images, labels = next(batches)
        ready = clock.mark()
        marks.losses.append(framework.forward_backward(images, labels, last=micro == accumulation - 1))
        marks.micro.append((ready, clock.mark()))
    with run.waiting("gradient allreduce", timeout=timeout):
        marks.hidden_wait_s = framework.wait_gradients()
    marks.reduced = clock.mark()
    framework.apply()
    marks.applied = clock.mark()
    return marks


@dataclass
class Steps:
    """The step loop of one rank: where it is, the stop vote in flight, and the steps not logged yet."""

    run: Run
    data: Any
    clock: Clock
    step_log: StepLog
    progress: Progress
    step: int
    vote: Any = None
    waiting_to_log: list[StepMarks] = field(default_factory=list)

    def run_to_end(self) -> None:
        """Steps until the plan's last; raises StopRequested when the ranks agreed to stop at a step boundary."""
        run, clock, config = self.run, self.clock, self.run.config
        start_step, total_steps = self.step, run.plan.total_steps
        boundary = clock.mark()
        while self.step < total_steps:
            timeout = run.first_step_timeout if self.step == start_step else config.stall_timeout
            marks = train_step(run, self.data, clock, self.step, boundary, timeout)
            self.step += 1
            # The flags summed at the previous boundary decide now; a new vote starts and overlaps the next step.
            agreed_stop = False
            with run.waiting("stop-flag vote"):  # begin blocks too where the vote is synchronous (TensorFlow)
                if self.vote is not None:
                    agreed_stop = run.comm.end_stop_vote(self.vote)
                self.vote = run.comm.begin_stop_vote(run.start.stop.local)
            marks.end, marks.wall_time = clock.mark(), time.time()
            self.waiting_to_log.append(marks)
            self.log_steps()
            if agreed_stop:
                raise StopRequested
            if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.step < total_steps:
                self.log_steps(all_of_them=True)  # every step before a checkpoint is in the log, as a resume expects
                run.save_checkpoint(self.step)
            boundary = clock.mark()

    def log_steps(self, all_of_them: bool = False) -> None:
        """Write the records of the steps whose marks can be read (all of them, waiting, when asked)."""
        run, clock = self.run, self.clock
        if all_of_them:
            clock.synchronize()
        while self.waiting_to_log and (all_of_them or clock.ready(self.waiting_to_log[0].end)):
            marks = self.waiting_to_log.pop(0)
            record = step_record(marks, clock, run.framework.loss_value(marks.losses), run.rank, run.ranks, run.plan)
            self.step_log.write(record)
            run.times.add(record)
            self.progress.update(record)

    def end_vote(self) -> None:
        """Collect the stop vote still in flight: every rank takes part in it before the next collective."""
        if self.vote is not None:
            with self.run.waiting("stop-flag vote"):
                self.run.comm.end_stop_vote(self.vote)
            self.vote = None


def finish_rank(steps: Steps, status: str, error: Exception | None = None) -> int:
    """How each of the three exits ends a rank's run; returns its exit status.

    ``complete`` and ``interrupted``: every step logged, the stop vote ended, the checkpoint (none at the end of
    a complete run under ``--no-final-checkpoint``), (``complete``: the evaluation), the summary. ``failed``: no
    collective (a peer may be gone): rank 0 writes the summary with its own step times."""
    run, config, step = steps.run, steps.run.config, steps.step
    if status == "failed":
        steps.progress.close()
        if not isinstance(error, ckpt.CheckpointWriteError):  # that one's message says it all
            traceback.print_exc()
        print(f"larscale train: rank {run.rank}: failed at step {step}: {type(error).__name__}: {error}",
              file=sys.stderr, flush=True)
        if run.rank == 0:
            with contextlib.suppress(Exception):
                write_summary(config.out, run.summary("failed", step, [run.times], None))
        return EXIT_FAILED
    steps.log_steps(all_of_them=True)
    steps.progress.close()
    steps.end_vote()
    if status != "complete" or config.final_checkpoint:
        run.save_checkpoint(step)
    evaluation = evaluate(run, steps.data) if status == "complete" and config.eval else None
    run.finish(status, step, evaluation)
    if status == "complete":
        log(run.rank, f"complete: {step} steps; summary {Path(config.out) / 'summary.json'}")
        return EXIT_COMPLETE
    # Everyone waits until rank 0 wrote the checkpoint and summary: a launcher may kill the job as soon as the
    # first rank exits non-zero.
    with run.waiting("final barrier"):
        run.comm.barrier()
    log(run.rank, f"stopped by {run.start.stop.signal_name or 'a signal on another rank'} at step {step}; "
        f"checkpoint {run.last_checkpoint}; resume with --resume (exit {EXIT_RESUMABLE})")
    return EXIT_RESUMABLE


def run_rank(config: TrainConfig, framework: Framework, comm: Communicator, stop: StopFlag) -> int:
    """One rank's whole run. Returns the exit status (raises UsageError for the user's mistakes). ``stop`` is the
    installed SIGTERM/SIGUSR1 flag; the run restores the previous handlers when it ends."""
    spec, image_size, num_classes = dataset_facts(config)
    framework.preflight()
    start = start_rank(comm, framework.setup, config.stall_timeout, stop)
    info = start.info
    rank, ranks = info.rank, info.ranks
    plan = make_plan(config, ranks, train_set_size(spec, config.seed), image_size, num_classes)
    framework.build(plan, comm)
    run = Run(config, framework, comm, start, plan, spec.name)

    # Resume and the starting state: rank 0's weights everywhere; random streams per rank.
    header, state = resume_header(run)
    if config.resume and header["path"] is None:
        log(rank, f"--resume: no complete checkpoint in {config.out}/checkpoints; starting from step 0")
    start_step = header["step"]
    framework.restore(state)
    del state
    with run.waiting("parameter broadcast", startup=True):
        framework.broadcast_state(comm, resumed=header["path"] is not None)
    if header["rng"] is not None and header["ranks"] == ranks:
        framework.restore_rng(header["rng"][rank])
    else:
        framework.seed_rng(config.seed, rank, start_step)
    if start_step >= plan.total_steps:
        log(rank, f"nothing to do: the checkpoint is at step {start_step} of {plan.total_steps}")

    data = framework.data(plan, spec, rank, ranks, start_step)
    step_log = StepLog(config.out, rank, keep_below=start_step if config.resume else None)
    b = plan.batch
    log(rank, f"{ranks} ranks ({comm.name}, {info.controller}), model {config.model} ({config.framework}), dataset "
        f"{spec.name}, global batch {b.global_batch} = {b.batch_per_rank} × {ranks} × {b.accumulation}, steps "
        f"{start_step}→{plan.total_steps}, {start.device.threads} threads/rank, device {start.device.device}, "
        f"{config.precision}{', channels-last' if start.device.details.get('channels_last') else ''}"
        f"{', compiled' if config.compile else ''}")

    steps = Steps(run, data, framework.clock(), step_log,
                  Progress(rank, start_step, plan.total_steps, config.log_every), start_step)
    try:
        with framework.device_scope():
            steps.run_to_end()
            return finish_rank(steps, "complete")
    except StopRequested:
        return finish_rank(steps, "interrupted")
    except Exception as err:
        return finish_rank(steps, "failed", err)
    finally:
        step_log.close()
        start.watchdog.stop()


def evaluate(run: Run, data: Any) -> dict[str, float] | None:
    """Top-1 and top-5 accuracy over all ranks' shards (counts summed over the ranks)."""
    batches = data.eval_batches()
    if batches is None:
        return None
    local = run.framework.evaluate(batches)
    with run.waiting("evaluation allreduce"):
        top1, top5, images = run.comm.sum(local, name="larscale.eval")
    n = max(images, 1.0)
    log(run.rank, f"eval: top-1 {top1 / n:.4f} top-5 {top5 / n:.4f} ({int(images)} images)")
    return {"top1": top1 / n, "top5": top5 / n}
