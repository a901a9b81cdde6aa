"""Flux (flux-core): ``flux batch`` with ``# flux:`` submission directives (RFC 36), one ``flux jobs`` for all jobs.

The proof that a scheduler is one file. ``flux batch`` prints the job id in Flux's F58 form (``ƒM7Zq9AKHno``,
or ``fM7Zq9AKHno`` where the locale cannot print ``ƒ``); larscale keeps the decimal form of the same 64-bit id
(F58 is base 58 over Bitcoin's alphabet), which every flux command accepts and which stays ASCII in file names
and attempt records (Open OnDemand's Flux adapter does the same). ``flux jobs`` prints F58 ids too, as in this
transcript of the real tool from flux-framework/flux-workflow-examples (job-submit-cli/README.md)::

    JOBID USER NAME ST NTASKS NNODES RUNTIME RANKS
    ƒ3ETxsR9H moussa1 io-forward R 1 1 2.858s 2

larscale asks for just the two columns it needs (``-o "{id.f58} {status_abbrev}"``, flux-jobs(1)). Inside the
job the script turns ``FLUX_JOB_ID`` into the same decimal id (``flux job id``).
"""

from __future__ import annotations

from jobs.schedulers import (
    JobRequest,
    Runner,
    Scheduler,
    States,
    SubmitError,
    check_answered,
    job_id_or_error,
    scheduler,
)

# flux jobs' status_abbrev (flux-jobs(1), JOB STATUS): pending (D/P/S, PD), running (R, C: cleanup), finished
# (CD completed, F failed, CA canceled, TO timeout) maps to None: the run's own files decide.
STATES = {"D": "pending", "P": "pending", "S": "pending", "PD": "pending", "R": "running", "C": "running"}
F58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def f58_to_decimal(text: str) -> str:
    """``ƒM7Zq9AKHno`` (or ``fM7…``) → the decimal job id; a decimal id is returned as it is."""
    word = text.strip()
    if word.isdigit():
        return word
    if word[:1] not in ("ƒ", "f") or len(word) < 2 or any(c not in F58 for c in word[1:]):
        return ""
    value = 0
    for c in word[1:]:
        value = value * 58 + F58.index(c)
    return str(value)


@scheduler
class Flux(Scheduler):
    name = "flux"
    prefix = "# flux:"
    forbidden_options = ("--job-name", "-N", "--nodes", "-n", "--nslots", "-c", "--cores-per-slot", "-g",
                         "--gpus-per-slot", "-t", "--time-limit", "--output", "--error", "--signal", "--cwd",
                         "--wrap", "--setattr", "-S")

    def why_forbidden(self, option: str) -> str:
        if option in ("--setattr", "-S"):
            return "it can rewrite any part of the job, its shell and its environment"
        if option in ("--cwd", "--wrap"):
            return "the job runs this script in the sweep directory"
        return "larscale writes it itself"

    def directives(self, job: JobRequest) -> list[str]:
        if job.qos:
            raise ValueError(f"qos {job.qos!r}: flux has no QoS; give the queue as job.partition and a bank as "
                             "job.account")
        minutes = -(-job.walltime_s // 60)
        # One slot per rank: its cores and GPUs; the nodes hold ranks_per_node slots each.
        out = [f"# flux: --job-name={job.name}", f"# flux: -N {job.nodes}",
               f"# flux: -n {job.nodes * job.ranks_per_node}", f"# flux: -c {job.threads_per_rank}"]
        if job.gpus_per_node:
            out.append(f"# flux: -g {max(1, job.gpus_per_node // job.ranks_per_node)}")
        out += [f"# flux: -t {minutes}m", f"# flux: --signal=SIGUSR1@{job.signal_s}s",
                "# flux: --output=logs/{{name}}-{{id}}.out"]
        out += [f"# flux: --bank={job.account}"] if job.account else []
        out += [f"# flux: --queue={job.partition}"] if job.partition else []
        return out + self.site_directives(job.site_lines)

    def script_lines(self) -> list[str]:
        return ['LARSCALE_JOB_ID=${LARSCALE_JOB_ID:-$(flux job id --to=dec "${FLUX_JOB_ID:-}" 2>/dev/null)}']

    def submit_argv(self, script: str, after: tuple[str, ...] = ()) -> tuple[list[str], bool]:
        dependency = [f"--dependency=afterany:{j}" for j in after]
        return ["flux", "batch", *dependency, script], False

    def parse_job_id(self, stdout: str) -> str:
        lines = stdout.strip().splitlines()
        job_id = f58_to_decimal(lines[-1]) if lines else ""
        if not job_id:
            raise SubmitError(f"cannot read a job id from the flux submission output {stdout!r}")
        return job_id_or_error(self.name, job_id, stdout)

    def query(self, job_ids: list[str], run: Runner) -> States:
        out: States = {}
        if not job_ids:
            return out
        proc = check_answered(run(["flux", "jobs", "-a", "-n", "-o", "{id.f58} {status_abbrev}", *job_ids]),
                              "flux jobs")
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                job_id = f58_to_decimal(parts[0])
                out[job_id] = (STATES.get(parts[1]), parts[1])
        return out

    def hosts_command(self) -> str | None:
        return "flux exec -r all hostname | sort -u"
