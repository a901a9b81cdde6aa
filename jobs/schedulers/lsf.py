"""IBM LSF: ``bsub`` directives read from the script on stdin (``-gpu "num=N"``), ``Job <id>`` ids, one ``bjobs``."""

from __future__ import annotations

from jobs.schedulers import JobRequest, Runner, Scheduler, States, check_answered, job_id_or_error, scheduler

STATES = {"PEND": "pending", "PSUSP": "pending", "RUN": "running", "USUSP": "running", "SSUSP": "running"}


@scheduler
class Lsf(Scheduler):
    name = "lsf"
    prefix = "#BSUB"
    forbidden_options = ("-J", "-n", "-W", "-o", "-e", "-oo", "-eo", "-E", "-Ep", "-cwd", "-wa", "-wt", "-i", "-is",
                         "-f", "-L")

    def why_forbidden(self, option: str) -> str:
        if option in ("-E", "-Ep"):
            return "it runs a command"
        if option in ("-L", "-cwd", "-i", "-is", "-f"):
            return "it changes the shell, the directory or the job's files"
        return "larscale writes it itself"

    def directives(self, job: JobRequest) -> list[str]:
        minutes = -(-job.walltime_s // 60)
        warn_minutes = max(1, -(-job.signal_s // 60))
        rpn = job.ranks_per_node
        out = [f"#BSUB -J {job.name}", f"#BSUB -n {job.nodes * rpn}", f'#BSUB -R "span[ptile={rpn}]"']
        if job.gpus_per_node:
            out.append(f'#BSUB -gpu "num={job.gpus_per_node}"')     # per host
        out += [f"#BSUB -W {minutes // 60}:{minutes % 60:02d}", "#BSUB -wa USR1", f"#BSUB -wt {warn_minutes}",
                "#BSUB -o logs/%J.out", "#BSUB -r"]                  # rerunnable: requeued after a host failure
        out += [f"#BSUB -P {job.account}"] if job.account else []
        out += [f"#BSUB -q {job.partition}"] if job.partition else []
        out += [f"#BSUB -sla {job.qos}"] if job.qos else []
        return out + self.site_directives(job.site_lines)

    def submit_argv(self, script: str, after: tuple[str, ...] = ()) -> tuple[list[str], bool]:
        # bsub reads #BSUB directives only from a script on stdin
        dependency = ["-w", " && ".join(f"ended({j})" for j in after)] if after else []
        return ["bsub", *dependency], True

    def parse_job_id(self, stdout: str) -> str:
        text = stdout.strip()   # "Job <123> is submitted to queue <normal>."
        start, end = text.find("<"), text.find(">")
        return job_id_or_error(self.name, text[start + 1:end] if 0 <= start < end else "", stdout)

    def query(self, job_ids: list[str], run: Runner) -> States:
        out: States = {}
        if not job_ids:
            return out
        proc = check_answered(run(["bjobs", "-noheader", "-o", "jobid stat", *job_ids]), "bjobs")
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = (STATES.get(parts[1]), parts[1])
        return out

    def hosts_command(self) -> str | None:
        return "printf '%s\\n' $LSB_HOSTS | sort -u"
