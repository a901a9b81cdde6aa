"""Slurm: ``sbatch`` directives, ``--parsable`` job ids, one ``squeue`` (and one ``sacct``) for all jobs."""

from __future__ import annotations

from jobs.schedulers import JobRequest, Runner, Scheduler, States, check_answered, job_id_or_error, scheduler
from larscale.machine import format_walltime

# Slurm's state words → ours. Anything finished maps to None: the run's own files decide.
STATES = {"PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
          "REQUEUE_FED": "pending", "RESIZING": "running", "RUNNING": "running", "COMPLETING": "running",
          "SUSPENDED": "running", "STOPPED": "running", "SIGNALING": "running", "STAGE_OUT": "running"}


@scheduler
class Slurm(Scheduler):
    name = "slurm"
    prefix = "#SBATCH"
    forbidden_options = ("--job-name", "-J", "--nodes", "-N", "--time", "-t", "--output", "-o", "--error", "-e",
                         "--signal", "--chdir", "-D", "--wrap", "--open-mode", "--ntasks-per-node",
                         "--cpus-per-task", "-c")
    agent_launcher = "srun"
    attached_values = True

    def why_forbidden(self, option: str) -> str:
        if option in ("--chdir", "-D"):
            return "the job runs in the sweep directory"
        if option == "--wrap":
            return "it would replace the script"
        return "larscale writes it itself"

    def directives(self, job: JobRequest) -> list[str]:
        out = [f"#SBATCH --job-name={job.name}", f"#SBATCH --nodes={job.nodes}",
               f"#SBATCH --ntasks-per-node={job.ranks_per_node}", f"#SBATCH --cpus-per-task={job.threads_per_rank}"]
        if job.gpus_per_node:
            out.append(f"#SBATCH --gres=gpu:{job.gpus_per_node}" if job.gpu_request == "gres"
                       else f"#SBATCH --gpus-per-node={job.gpus_per_node}")
        out += [f"#SBATCH --time={format_walltime(job.walltime_s)}", f"#SBATCH --signal=B:USR1@{job.signal_s}",
                "#SBATCH --output=logs/%x-%j.out",
                # A node failure or preemption requeues the job (the script resumes its points); a requeued job
                # appends to its log instead of truncating the first run's.
                "#SBATCH --requeue", "#SBATCH --open-mode=append"]
        out += [f"#SBATCH --{k}={v}" for k, v in (("account", job.account), ("partition", job.partition),
                                                  ("qos", job.qos)) if v is not None]
        return out + self.site_directives(job.site_lines)

    def submit_argv(self, script: str, after: tuple[str, ...] = ()) -> tuple[list[str], bool]:
        dependency = [f"--dependency=afterany:{':'.join(after)}"] if after else []
        return ["sbatch", "--parsable", *dependency, script], False

    def parse_job_id(self, stdout: str) -> str:
        text = stdout.strip()   # "123" or "123;cluster"
        return job_id_or_error(self.name, text.splitlines()[-1].split(";")[0].strip() if text else "", stdout)

    def query(self, job_ids: list[str], run: Runner) -> States:
        out: States = {}
        if not job_ids:
            return out
        proc = check_answered(run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)]), "squeue")
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = (STATES.get(parts[1]), parts[1])
        gone = [j for j in job_ids if j not in out]
        if gone:
            # Finished jobs: accounting remembers them (one query for all); without accounting, the controller
            # remembers each for MinJobAge.
            proc = run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(gone)])
            if proc.returncode == 0:
                for line in proc.stdout.splitlines():
                    job, _, word = line.partition("|")
                    word = word.split()[0] if word.split() else ""
                    if job in gone and word:
                        out[job] = (STATES.get(word), word)
            for job in (j for j in gone if j not in out):
                proc = check_answered(run(["scontrol", "-o", "show", "job", job]), "scontrol")
                fields = dict(t.split("=", 1) for t in proc.stdout.split() if "=" in t)
                word = fields.get("JobState", "")
                out[job] = (STATES.get(word), word or "UNKNOWN")
        return out

    def hosts_command(self) -> str | None:
        return 'scontrol show hostnames "$SLURM_JOB_NODELIST"'

    def first_host(self) -> str:
        return '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
