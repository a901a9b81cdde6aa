"""PBS Pro / Torque: ``qsub`` directives (``select`` chunks with ``ngpus``, or ``nodes=N:ppn=R``), one ``qstat``."""

from __future__ import annotations

import json

from jobs.schedulers import JobRequest, Runner, Scheduler, States, check_answered, job_id_or_error, scheduler
from larscale.machine import format_walltime

STATES = {"Q": "pending", "H": "pending", "W": "pending", "T": "pending", "S": "running", "R": "running",
          "E": "running", "B": "running"}


@scheduler
class Pbs(Scheduler):
    name = "pbs"
    prefix = "#PBS"
    forbidden_options = ("-N", "-o", "-e", "-j", "-S", "-d", "-w", "-C", "-I")

    def why_forbidden(self, option: str) -> str:
        if option in ("-S", "-C"):
            return "it changes the shell or the directive prefix of the script"
        if option in ("-d", "-w"):
            return "the job runs in the sweep directory"
        return "larscale writes it itself"

    def directives(self, job: JobRequest) -> list[str]:
        rpn, threads = job.ranks_per_node, job.threads_per_rank
        if job.pbs_resources == "select":
            gpus = f":ngpus={job.gpus_per_node}" if job.gpus_per_node else ""
            resources = f"select={job.nodes}:ncpus={rpn * threads}:mpiprocs={rpn}:ompthreads={threads}{gpus}"
        else:
            gpus = f":gpus={job.gpus_per_node}" if job.gpus_per_node else ""
            resources = f"nodes={job.nodes}:ppn={rpn * threads}{gpus}"
        out = [f"#PBS -N {job.name}", f"#PBS -l {resources}", f"#PBS -l walltime={format_walltime(job.walltime_s)}",
               "#PBS -j oe", f"#PBS -o logs/{job.name}.out", "#PBS -r y"]   # rerunnable: requeued after a node failure
        out += [f"#PBS -A {job.account}"] if job.account else []
        out += [f"#PBS -q {job.partition}"] if job.partition else []
        out += [f"#PBS -l qos={job.qos}"] if job.qos else []
        return out + self.site_directives(job.site_lines)

    def submit_argv(self, script: str, after: tuple[str, ...] = ()) -> tuple[list[str], bool]:
        dependency = ["-W", f"depend=afterany:{':'.join(after)}"] if after else []
        return ["qsub", *dependency, script], False

    def parse_job_id(self, stdout: str) -> str:
        text = stdout.strip()   # "123.server"
        return job_id_or_error(self.name, text.splitlines()[-1].strip() if text else "", stdout)

    def query(self, job_ids: list[str], run: Runner) -> States:
        if not job_ids:
            return {}
        proc = check_answered(run(["qstat", "-x", "-f", "-F", "json", *job_ids]), "qstat")
        try:
            jobs = json.loads(proc.stdout).get("Jobs", {}) if proc.stdout.strip() else {}
        except (json.JSONDecodeError, AttributeError):
            jobs = {}
        out: States = {}
        for job_id in job_ids:
            # qstat names a job by its full id ("123.server.domain"); ours may be shorter ("123.server").
            info = jobs.get(job_id) or next((v for k, v in jobs.items() if k.startswith(job_id + ".")), None)
            word = info.get("job_state", "") if isinstance(info, dict) else ""
            out[job_id] = (STATES.get(word), word or "UNKNOWN")
        return out

    def hosts_command(self) -> str | None:
        return 'sort -u "$PBS_NODEFILE"'
