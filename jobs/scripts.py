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
forwards ``SIGUSR1`` to the running launcher (mpirun and srun pass it to every rank), whose trainer then
checkpoints and exits 75; the script stops starting further points and exits 75 too. Each run's exit status is
written to ``status/<point>.exit`` for `larscale sweep status`. A Slurm requeue (``SLURM_RESTART_COUNT`` > 0)
resumes from the checkpoint.
"""

from __future__ import annotations

import re
import shlex

from jobs.sweep import JobGroup, Plan, Point
from larscale.machine import format_walltime

DIRECTIVE_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SCHEDULERS = ("slurm", "pbs", "lsf", "local")
LAUNCHERS = ("srun", "mpirun", "ibrun", "horovodrun", "jsrun")
# Environment every rank gets (the trainer's TensorFlow path needs tf-keras, see README).
BASE_ENV = (("TF_USE_LEGACY_KERAS", "1"), ("PYTHONUNBUFFERED", "1"))


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
               "#SBATCH --output=logs/%x-%j.out"]
        out += [f"#SBATCH --{k}={v}" for k, v in (("account", account), ("partition", partition), ("qos", qos))
                if v is not None]
        return out
    if m.scheduler == "pbs":
        if job.pbs_resources == "select":
            resources = f"select={group.nodes}:ncpus={rpn * threads}:mpiprocs={rpn}:ompthreads={threads}"
        else:
            resources = f"nodes={group.nodes}:ppn={rpn * threads}"
        out = [f"#PBS -N {name}", f"#PBS -l {resources}", f"#PBS -l walltime={wall}", "#PBS -j oe",
               f"#PBS -o logs/{name}.out"]
        out += [f"#PBS -A {account}"] if account else []
        out += [f"#PBS -q {partition}"] if partition else []
        out += [f"#PBS -l qos={qos}"] if qos else []
        return out
    if m.scheduler == "lsf":
        minutes = -(-group.walltime_s // 60)
        warn_minutes = max(1, -(-job.signal_s // 60))
        out = [f"#BSUB -J {name}", f"#BSUB -n {group.nodes * rpn}", f'#BSUB -R "span[ptile={rpn}]"',
               f"#BSUB -W {minutes // 60}:{minutes % 60:02d}", "#BSUB -wa USR1", f"#BSUB -wt {warn_minutes}",
               "#BSUB -o logs/%J.out"]
        out += [f"#BSUB -P {account}"] if account else []
        out += [f"#BSUB -q {partition}"] if partition else []
        out += [f"#BSUB -sla {qos}"] if qos else []
        return out
    return []


def host_list_lines(scheduler: str, ranks_per_node: int) -> list[str]:
    """Shell lines that set LARSCALE_HOSTS=host1:R,host2:R for horovodrun, from the scheduler's node list."""
    r = int(ranks_per_node)
    if scheduler == "slurm":
        src = 'scontrol show hostnames "$SLURM_JOB_NODELIST"'
    elif scheduler == "pbs":
        src = 'sort -u "$PBS_NODEFILE"'
    elif scheduler == "lsf":
        src = "printf '%s\\n' $LSB_HOSTS | sort -u"
    else:
        return ["LARSCALE_HOSTS=localhost:" + str(r)]
    return [f"LARSCALE_HOSTS=$({src} | sed 's/$/:{r}/' | paste -sd, -)"]


def launcher_argv(plan: Plan, point: Point) -> list[str]:
    """The launcher's words before the program: trusted constants and validated integers only, plus the
    profile's launcher_flags (each one word, quoted)."""
    m = plan.machine
    ranks, rpn, threads, nodes = point.ranks, point.ranks_per_node, point.threads_per_rank, point.nodes
    flags = list(m.launcher_flags)
    if m.launcher == "srun":
        return ["srun", f"--nodes={nodes}", f"--ntasks={ranks}", f"--ntasks-per-node={rpn}",
                f"--cpus-per-task={threads}", *flags]
    if m.launcher == "mpirun":
        if m.mpi_flavor == "intelmpi":
            binding = [] if any("I_MPI_PIN" in f for f in flags) else ["-genv", "I_MPI_PIN_DOMAIN", "omp"]
            return ["mpirun", "-n", str(ranks), "-ppn", str(rpn), "-genv", "OMP_NUM_THREADS", str(threads),
                    *binding, *flags]
        binding = [] if "--bind-to" in flags or "--map-by" in flags else [
            "--map-by", f"ppr:{rpn}:node:PE={threads}", "--bind-to", "core"]
        exports = [w for name in ("OMP_NUM_THREADS", *(k for k, _ in BASE_ENV), *plan.spec.job.env)
                   for w in ("-x", name)]
        return ["mpirun", "-np", str(ranks), *binding, *exports, *flags]
    if m.launcher == "ibrun":
        return ["ibrun", "-n", str(ranks), "-o", "0", *flags]
    if m.launcher == "horovodrun":
        return ["horovodrun", "-np", str(ranks), "-H", "$LARSCALE_HOSTS", *flags]
    if m.launcher == "jsrun":
        gpus = 1 if m.node.devices.kind == "gpu" else 0
        return ["jsrun", f"--nrs={ranks}", "--tasks_per_rs=1", f"--cpu_per_rs={threads}", f"--gpu_per_rs={gpus}",
                f"--rs_per_host={rpn}", *flags]
    raise ValueError(f"unknown launcher {m.launcher!r}; choose one of {', '.join(LAUNCHERS)}")


def _words(argv: list[str]) -> str:
    # "$LARSCALE_HOSTS" is the one word we generate that must expand; everything else is quoted.
    return " ".join('"$LARSCALE_HOSTS"' if w == "$LARSCALE_HOSTS" else q(w) for w in argv)


PRELUDE = r"""larscale_pid=""
larscale_stop=0
larscale_status=0
# The scheduler's pre-timeout signal (or PBS's SIGTERM) asks the running trainer to checkpoint and stop.
larscale_forward() {
  larscale_stop=1
  if [ -n "$larscale_pid" ]; then kill -s USR1 "$larscale_pid" 2>/dev/null || true; fi
}
trap larscale_forward USR1 TERM
# larscale_run POINT_ID COMMAND...: run in the background so traps fire at once, then record its exit status.
larscale_run() {
  local point=$1 status next
  shift
  printf '%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "status/$point.started"
  "$@" &
  larscale_pid=$!
  wait "$larscale_pid"; status=$?
  # A trapped signal interrupts `wait` (status > 128) while the launcher still runs: wait for it again.
  while [ "$status" -gt 128 ] && [ "$larscale_stop" = 1 ]; do
    wait "$larscale_pid"; next=$?
    [ "$next" -eq 127 ] && break
    status=$next
  done
  larscale_pid=""
  printf '%s\n' "$status" > "status/$point.exit"
  if [ "$status" -ne 0 ] && [ "$larscale_status" -eq 0 ]; then larscale_status=$status; fi
  if [ "$status" -eq 75 ]; then larscale_status=75; larscale_stop=1; fi
}
"""


def render(plan: Plan, group: JobGroup, resume: frozenset[str] | set[str] = frozenset()) -> str:
    """The whole batch script for one job group. ``resume``: ids of points that continue from a checkpoint."""
    m, job = plan.machine, plan.spec.job
    lines = ["#!/bin/bash", *directives(plan, group),
             f"# larscale sweep {plan.spec.name}: {len(group.points)} run(s) on {group.nodes} node(s), "
             f"{m.scheduler}/{m.launcher} ({m.name})",
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
    if m.launcher == "horovodrun":
        lines += host_list_lines(m.scheduler, max(p.ranks_per_node for p in group.points))
    lines.append(PRELUDE.rstrip("\n"))
    for point in group.points:
        argv = plan.train_argv(point, resume=point.point_id in resume)
        lines.append(f"# {point.point_id}: {point.nodes} node(s) x {point.ranks_per_node} rank(s), global batch "
                     f"{point.global_batch} ({point.batch_per_rank} per rank), walltime {point.walltime}")
        lines.append(f"larscale_argv=({_words(launcher_argv(plan, point))} {_words(argv)})")
        if m.scheduler == "slurm" and point.point_id not in resume:
            # An automatic requeue restarts this script: continue from the checkpoint instead of from step 0.
            lines.append('if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then larscale_argv+=(--resume); fi')
        lines.append(f'if [ "$larscale_stop" = 0 ]; then larscale_run {q(point.point_id)} "${{larscale_argv[@]}}"; fi')
    lines.append('exit "$larscale_status"')
    return "\n".join(lines) + "\n"


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
