"""Batch scripts for Slurm (sbatch), PBS Pro/Torque (qsub), LSF (bsub) and local runs.

A script is a bash program: scheduler directives, then the profile's setup lines, then one launcher line per
point of its job. Safety rule: every value that comes from a user (paths, model and dataset names, trainer
arguments, environment values) reaches bash only through :func:`shlex.quote`; values that must sit in a
scheduler directive (job name, account, partition, QoS), where no shell quoting applies, are validated against
a strict pattern instead, and log paths there are relative to the sweep directory (submission runs there), so
no user path ever appears in a directive. The profile's ``env`` lines are shell by design (``module load``) and
are copied verbatim: a profile is trusted like a shell script.

Walltime signal: Slurm sends ``SIGUSR1`` to the batch shell ``signal_s`` seconds before the limit
(``--signal=B:USR1@N``), LSF likewise (``-wa USR1 -wt``), PBS sends ``SIGTERM``. The script traps these and
forwards the launcher's stop signal (``SIGUSR1``; ``SIGTERM`` for torchrun) to the running launcher, which
passes it to every rank; the trainer checkpoints and exits 75, and the script stops starting further points
and exits 75 too.

Failures heal inside the job: a run that fails because a rank died or hung (any exit status but 0, 75, 2 =
usage error, 126/127 = not runnable) is relaunched with ``--resume`` from its newest checkpoint after
``job.retry_backoff_s``, up to ``job.max_retries`` times, and no more once an attempt gets no further (in
steps logged) than the one before. Every attempt appends a start and an end line to
``status/<point>.attempts.jsonl`` (job id, exit status, steps reached, newest checkpoint and its time), which
``sweep status``/``collect`` turn into the manifest's attempts (jobs/attempts.py); the final exit status goes to
``status/<point>.exit``. Across allocations the jobs are rerunnable (``--requeue``, ``-r y``, ``-r``): a requeued
script finds its own earlier records, resumes the points it had started and skips the complete ones.
"""

from __future__ import annotations

import re
import shlex

from jobs.launchers import BASE_ENV, LAUNCHERS, ShellWord, get_launcher, launcher_name
from jobs.sweep import JobGroup, Plan, Point
from larscale.machine import format_walltime
from larscale.schema import SchemaError

DIRECTIVE_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SCHEDULERS = ("slurm", "pbs", "lsf", "local")
__all__ = ["BASE_ENV", "LAUNCHERS", "SCHEDULERS", "check_launch", "directives", "render", "submit_command",
           "trainer_argv"]


def q(value: object) -> str:
    return shlex.quote(str(value))


def _directive_value(value: str, what: str) -> str:
    if not DIRECTIVE_SAFE.match(value) or len(value) > 128:
        raise ValueError(f"{what} {value!r} cannot go into a scheduler directive: use letters, digits, "
                         "'.', '_' and '-' only")
    return value


def directives(plan: Plan, group: JobGroup) -> list[str]:
    """The scheduler's header lines for one job (empty for ``local``)."""
    m, job = plan.machine, plan.spec.job
    name = _directive_value(group.job_name, "job name")
    rpn = max(p.ranks_per_node for p in group.points)
    threads = max(p.threads_per_rank for p in group.points)
    wall = format_walltime(group.walltime_s)
    account = job.account or m.account
    partition = job.partition or m.partition
    qos = job.qos or m.qos
    for value, what in ((account, "account"), (partition, "partition"), (qos, "qos")):
        if value is not None:
            _directive_value(value, what)
    if m.scheduler == "slurm":
        out = [f"#SBATCH --job-name={name}", f"#SBATCH --nodes={group.nodes}",
               f"#SBATCH --ntasks-per-node={rpn}", f"#SBATCH --cpus-per-task={threads}",
               f"#SBATCH --time={wall}", f"#SBATCH --signal=B:USR1@{job.signal_s}",
               "#SBATCH --output=logs/%x-%j.out",
               # A node failure or preemption requeues the job (the script resumes its points); a requeued job
               # appends to its log instead of truncating the first run's.
               "#SBATCH --requeue", "#SBATCH --open-mode=append"]
        out += [f"#SBATCH --{k}={v}" for k, v in (("account", account), ("partition", partition), ("qos", qos))
                if v is not None]
        return out
    if m.scheduler == "pbs":
        if job.pbs_resources == "select":
            resources = f"select={group.nodes}:ncpus={rpn * threads}:mpiprocs={rpn}:ompthreads={threads}"
        else:
            resources = f"nodes={group.nodes}:ppn={rpn * threads}"
        out = [f"#PBS -N {name}", f"#PBS -l {resources}", f"#PBS -l walltime={wall}", "#PBS -j oe",
               f"#PBS -o logs/{name}.out", "#PBS -r y"]      # rerunnable: requeued after a node failure
        out += [f"#PBS -A {account}"] if account else []
        out += [f"#PBS -q {partition}"] if partition else []
        out += [f"#PBS -l qos={qos}"] if qos else []
        return out
    if m.scheduler == "lsf":
        minutes = -(-group.walltime_s // 60)
        warn_minutes = max(1, -(-job.signal_s // 60))
        out = [f"#BSUB -J {name}", f"#BSUB -n {group.nodes * rpn}", f'#BSUB -R "span[ptile={rpn}]"',
               f"#BSUB -W {minutes // 60}:{minutes % 60:02d}", "#BSUB -wa USR1", f"#BSUB -wt {warn_minutes}",
               "#BSUB -o logs/%J.out", "#BSUB -r"]                # rerunnable: requeued after a host failure
        out += [f"#BSUB -P {account}"] if account else []
        out += [f"#BSUB -q {partition}"] if partition else []
        out += [f"#BSUB -sla {qos}"] if qos else []
        return out
    return []


def _words(argv: list[str]) -> str:
    # ShellWords are generated by us and must expand ("$LARSCALE_HOSTS"); everything else is quoted.
    return " ".join(f'"{w}"' if isinstance(w, ShellWord) else q(w) for w in argv)


PRELUDE = r"""larscale_pid=""
larscale_rc=0
larscale_stop=0
larscale_status=0
# This job in the attempt records: the scheduler's job id (LARSCALE_JOB_ID for local runs).
larscale_job=${SLURM_JOB_ID:-${PBS_JOBID:-${LSB_JOBID:-${LARSCALE_JOB_ID:-local-$$}}}}
larscale_job=${larscale_job//[^A-Za-z0-9._-]/_}
# The scheduler's pre-timeout signal (or PBS's SIGTERM) asks the running trainer to checkpoint and stop.
larscale_forward() {
  larscale_stop=1
  if [ -n "$larscale_pid" ]; then kill -s "$larscale_signal" "$larscale_pid" 2>/dev/null || true; fi
}
trap larscale_forward USR1 TERM
# larscale_launch COMMAND...: run in the background so traps fire at once; its exit status goes to larscale_rc.
larscale_launch() {
  local next
  "$@" &
  larscale_pid=$!
  wait "$larscale_pid"; larscale_rc=$?
  # A trapped signal interrupts `wait` (status > 128) while the launcher still runs: wait for it again.
  while [ "$larscale_rc" -gt 128 ] && [ "$larscale_stop" = 1 ]; do
    wait "$larscale_pid"; next=$?
    [ "$next" -eq 127 ] && break
    larscale_rc=$next
  done
  larscale_pid=""
}
# larscale_progress RUN_DIR: larscale_steps = steps done by the furthest rank (the last line of its step log),
# larscale_ckpt = the newest checkpoint's step (-1: none) and larscale_ckpt_time = when it was written.
larscale_progress() {
  local log last newest
  larscale_steps=0 larscale_ckpt=-1 larscale_ckpt_time=0
  for log in "$1"/steps/rank-*.jsonl; do
    last=$(tail -n 1 "$log" 2>/dev/null | sed -n 's/.*"step": *\([0-9][0-9]*\).*/\1/p')
    if [ -n "$last" ] && [ "$last" -ge "$larscale_steps" ]; then larscale_steps=$((last + 1)); fi
  done
  newest=$(ls "$1/checkpoints" 2>/dev/null | sed -n 's/^ckpt-\([0-9]\{8\}\)\.pt$/\1/p' | sort | tail -n 1)
  if [ -n "$newest" ]; then
    larscale_ckpt=$((10#$newest))
    larscale_ckpt_time=$(stat -c %.9Y "$1/checkpoints/ckpt-$newest.pt" 2>/dev/null)
    case $larscale_ckpt_time in  # coreutils without %.9Y: whole seconds
      '' | *[!0-9.]*) larscale_ckpt_time=$(stat -c %Y "$1/checkpoints/ckpt-$newest.pt" 2>/dev/null || echo 0) ;;
    esac
  fi
}
# larscale_run POINT RUN_DIR new|resume COMMAND...: run one point, one line per attempt start and end in
# status/POINT.attempts.jsonl. A failed attempt (a rank died or hung: any exit status but 0, 75 = stopped with a
# checkpoint, 2 = usage error, 126/127 = not runnable) is relaunched with --resume after the back-off, up to
# larscale_max_retries times, while each attempt gets further than the one before.
larscale_run() {
  local point=$1 run_dir=$2 mode=$3 records="status/$1.attempts.jsonl"
  local attempt retries=0 reached=-1 requeue=false why="" rc=0 line
  shift 3
  if [ "$(cat "status/$point.exit" 2>/dev/null)" = 0 ] &&
     grep -Eqs '"status": *"complete"' "$run_dir/summary.json"; then
    echo "larscale: $point is complete: not run again" >&2
    return 0
  fi
  rm -f "status/$point.exit"
  if [ -s "$records" ]; then
    mode=resume  # launched before (a resubmission, or this job requeued): continue from its newest checkpoint
    if grep -qF "\"job\": \"$larscale_job\"" "$records"; then requeue=true; fi
  fi
  attempt=$(cat "$records" 2>/dev/null | grep -c '"event": "start"')
  printf '%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "status/$point.started"
  while :; do
    attempt=$((attempt + 1))
    printf '{"event": "start", "attempt": %d, "job": "%s", "mode": "%s", "requeue": %s, "time": %s}\n' \
      "$attempt" "$larscale_job" "$mode" "$requeue" "$(date +%s.%N)" >> "$records"
    if [ "$mode" = resume ]; then larscale_launch "$@" --resume; else larscale_launch "$@"; fi
    rc=$larscale_rc
    if [ "$larscale_stop" = 1 ] && [ "$rc" -ne 0 ] && [ "$rc" -ne 75 ] && [ "$run_dir/summary.json" -nt "$records" ] &&
       grep -Eqs '"status": *"interrupted"' "$run_dir/summary.json"; then
      rc=75  # the ranks checkpointed and stopped; the launcher (torchrun) reported the signal as a failure
    fi
    larscale_progress "$run_dir"
    case $rc in
      0|75) ;;
      2) why="exit 2 is a usage error: not retried" ;;
      126|127) why="exit $rc, the command could not run: not retried" ;;
      *) if [ "$larscale_stop" = 1 ]; then why="stopped by the scheduler's signal: not retried"
         elif [ "$retries" -ge "$larscale_max_retries" ]; then
           why="failed $((retries + 1)) times in this job (job.max_retries $larscale_max_retries): not retried"
         elif [ "$larscale_steps" -le "$reached" ]; then
           why="no progress: failed at step $larscale_steps, no further than attempt $((attempt - 1)): not retried"
         fi ;;
    esac
    line=$(printf '{"event": "end", "attempt": %d, "job": "%s", "exit": %d, "steps": %d, ' \
      "$attempt" "$larscale_job" "$rc" "$larscale_steps")
    printf '%s"checkpoint": %d, "checkpoint_time": %s, "time": %s, "why": "%s"}\n' \
      "$line" "$larscale_ckpt" "$larscale_ckpt_time" "$(date +%s.%N)" "$why" >> "$records"
    if [ "$rc" -eq 0 ] || [ "$rc" -eq 75 ] || [ -n "$why" ]; then break; fi
    retries=$((retries + 1)) reached=$larscale_steps mode=resume requeue=false
    echo "larscale: $point: attempt $attempt exited $rc at step $larscale_steps; retry $retries of" \
      "$larscale_max_retries in $larscale_backoff_s s from checkpoint step $larscale_ckpt" >&2
    larscale_launch sleep "$larscale_backoff_s"
    if [ "$larscale_stop" = 1 ]; then why="stopped by the scheduler's signal before retrying"; break; fi
  done
  if [ -n "$why" ]; then echo "larscale: $point: attempt $attempt exited $rc: $why" >&2; fi
  printf '%s\n' "$rc" > "status/$point.exit"
  if [ "$rc" -ne 0 ] && [ "$larscale_status" -eq 0 ]; then larscale_status=$rc; fi
  if [ "$rc" -eq 75 ]; then larscale_status=75; larscale_stop=1; fi
}
"""


def check_launch(plan: Plan) -> None:
    """Refuse a launcher that cannot start the plan's ranks (backend, MPI flavour, scheduler), naming the
    field to change; SchemaError (a ValueError)."""
    name = launcher_name(plan)
    reason = get_launcher(name).refuse(plan, plan.machine.scheduler)
    if reason is None:
        return
    if plan.spec.job.launcher:
        raise SchemaError("job.launcher", reason)
    raise SchemaError("training.backend" if plan.spec.training.backend != "horovod" else "machine.launcher",
                      f"machine {plan.machine.name!r} launches with {name}: {reason}")


def trainer_argv(plan: Plan, point: Point) -> list[str]:
    """The trainer's command of one point (interpreter first); ``--resume`` is the script's to add."""
    argv = plan.train_argv(point)
    if plan.spec.training.backend != "horovod":
        argv += ["--backend", plan.spec.training.backend]
    return argv


def render(plan: Plan, group: JobGroup, resume: frozenset[str] | set[str] = frozenset()) -> str:
    """The whole batch script for one job group. ``resume``: ids of points that continue from a checkpoint
    (the script also resumes a point that it finds launched before: a retry, or a requeued job)."""
    check_launch(plan)
    m, job = plan.machine, plan.spec.job
    name = launcher_name(plan)
    launcher = get_launcher(name)
    lines = ["#!/bin/bash", *directives(plan, group),
             f"# larscale sweep {plan.spec.name}: {len(group.points)} run(s) on {group.nodes} node(s), "
             f"{m.scheduler}/{name} ({m.name})",
             "set -u",
             f"cd -- {q(plan.output_dir)} || exit 1",
             "mkdir -p status logs"]
    if m.env:
        lines.append("# machine profile setup")
        lines += list(m.env)
    threads = max(p.threads_per_rank for p in group.points)
    lines.append(f"export OMP_NUM_THREADS={int(threads)}")
    lines += [f"export {k}={q(v)}" for k, v in BASE_ENV]
    lines += [f"export {k}={q(v)}" for k, v in job.env.items()]
    lines += launcher.setup_lines(plan, group.points, m.scheduler)
    lines += ["# A failed run is relaunched in this job (job.max_retries, job.retry_backoff_s); "
              f"SIG{launcher.stop_signal} asks {name}'s ranks to checkpoint and stop.",
              f"larscale_max_retries={int(job.max_retries)}",
              f"larscale_backoff_s={_seconds(job.retry_backoff_s)}",
              f"larscale_signal={launcher.stop_signal}"]
    lines.append(PRELUDE.rstrip("\n"))
    for point in group.points:
        command = launcher.command(plan, point, trainer_argv(plan, point))
        lines.append(f"# {point.point_id}: {point.nodes} node(s) x {point.ranks_per_node} rank(s), global batch "
                     f"{point.global_batch} ({point.batch_per_rank} per rank), walltime {point.walltime}")
        lines.append(f"larscale_argv=({_words(command)})")
        mode = "resume" if point.point_id in resume else "new"
        lines.append(f'if [ "$larscale_stop" = 0 ]; then larscale_run {q(point.point_id)} '
                     f'{q(plan.run_dir(point))} {mode} "${{larscale_argv[@]}}"; fi')
    lines.append('exit "$larscale_status"')
    return "\n".join(lines) + "\n"


def _seconds(value: float) -> str:
    """Seconds for sleep(1): ``5`` or ``0.5``."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def submit_command(scheduler: str, script_name: str) -> tuple[list[str], bool]:
    """(argv, script_on_stdin) that submits a script from the sweep directory."""
    if scheduler == "slurm":
        return ["sbatch", "--parsable", script_name], False
    if scheduler == "pbs":
        return ["qsub", script_name], False
    if scheduler == "lsf":
        return ["bsub"], True      # bsub reads #BSUB directives only from a script on stdin
    if scheduler == "local":
        return ["bash", script_name], False
    raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
