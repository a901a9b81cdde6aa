"""Schedulers: one registered class per batch system, one file each (slurm.py, pbs.py, lsf.py, local.py, flux.py).

A scheduler knows its own words and nothing else: the directives of one job (:class:`JobRequest`), the
command that submits a script (and makes it wait for earlier jobs: a walltime chain), how to read the job id
that command prints, one query for the states of all of a sweep's jobs and what its state words mean, the
shell command that lists the allocation's hosts, and which of its options a profile's or spec's free-form site
lines may not use. Adding a scheduler is one new module in this package: every module here is imported and its
``@scheduler`` classes registered, and the profile's ``scheduler`` field is checked against this registry.

Site lines (``site_lines`` in the profile and ``job.site_lines`` in the spec, e.g. ``-C gpu``, ``--exclusive``,
``-l filesystems=home:eagle``) are options written after the scheduler's directive prefix. They never reach a
shell (bash reads a directive as a comment), but the scheduler reads them, so they are validated: one line,
printable, starting with ``-``, and none of the options that run a command (LSF ``-E``/``-Ep``), move the job
(``--chdir``) or replace what larscale writes itself (job name, nodes, walltime, log, signal).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

# Runs a query command (argv) and returns its result: jobs/submit.py passes one that carries the environment.
Runner = Callable[[list[str]], subprocess.CompletedProcess]
# job id → (our active state "pending"/"running", or None when finished or unknown; the scheduler's own word)
States = dict[str, tuple[str | None, str]]

DIRECTIVE_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SITE_LINE = re.compile(r"^-[-A-Za-z0-9]")


class SubmitError(RuntimeError):
    """The scheduler refused a submission, or its answer could not be read (its message is included)."""


class SchedulerUnavailable(RuntimeError):
    """The scheduler did not answer (a timeout, a controller restarting): its jobs' states are unknown, not ended."""


# Words of a status command that could not reach its controller (Slurm, PBS, LSF, Flux), as opposed to one that
# answered that a job is unknown.
UNREACHABLE = ("timed out", "unable to contact", "connection refused", "not responding", "could not connect",
               "communication", "cannot connect", "unreachable")


def check_answered(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    """``proc`` unless it failed because the scheduler could not be reached (then SchedulerUnavailable)."""
    if proc.returncode != 0 and any(w in (proc.stderr or "").lower() for w in UNREACHABLE):
        raise SchedulerUnavailable(f"{what} did not answer: {(proc.stderr or '').strip()[:200]}")
    return proc


class SiteLineError(ValueError):
    """A site line that cannot go into a directive (the reason names the line)."""


@dataclass(frozen=True)
class JobRequest:
    """What one job asks the scheduler for, in plain numbers; the scheduler writes it in its own words."""

    name: str
    nodes: int
    ranks_per_node: int
    threads_per_rank: int
    walltime_s: int
    signal_s: int
    gpus_per_node: int = 0
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    pbs_resources: str = "select"
    gpu_request: str = "gpus-per-node"
    site_lines: tuple[str, ...] = field(default_factory=tuple)


def directive_value(value: str, what: str) -> str:
    """A value that goes into a directive unquoted: letters, digits, '.', '_', '-' only."""
    if not DIRECTIVE_SAFE.match(value) or len(value) > 128:
        raise ValueError(f"{what} {value!r} cannot go into a scheduler directive: use letters, digits, "
                         "'.', '_' and '-' only")
    return value


class Scheduler:
    """Base class: a scheduler that runs nothing itself (subclasses say how)."""

    name: ClassVar[str]
    # The prefix of a directive line ("#SBATCH"); empty: the scheduler reads no directives (local).
    prefix: ClassVar[str] = ""
    # Options a site line may not give: what larscale writes itself, and what would run a command.
    forbidden_options: ClassVar[tuple[str, ...]] = ()
    # Whether a short option takes its value attached ("-t10" is "-t 10"), so "-t10" is the forbidden "-t".
    attached_values: ClassVar[bool] = False
    # The launcher that starts one agent per node inside a job (torchrun's agents), or None.
    agent_launcher: ClassVar[str | None] = None
    # The script runs here in the foreground (local) instead of being submitted to a queue.
    runs_here: ClassVar[bool] = False
    # Seconds between two queries of the scheduler (site rules forbid hammering squeue and friends).
    min_poll_s: ClassVar[float] = 30.0

    def directives(self, job: JobRequest) -> list[str]:
        return []

    def site_directives(self, lines: tuple[str, ...] | list[str], where: str = "site_lines") -> list[str]:
        """Each site line as a directive, after :meth:`check_site_line`."""
        return [f"{self.prefix} {self.check_site_line(line, f'{where}[{i}]')}" for i, line in enumerate(lines)]

    def check_site_line(self, line: str, where: str = "site_lines") -> str:
        if not self.prefix:
            raise SiteLineError(f"{where}: scheduler {self.name} reads no directives, got {line!r}")
        if not line or not line.isprintable() or len(line) > 200:
            raise SiteLineError(f"{where}: one printable line of at most 200 characters, got {line!r}")
        if not SITE_LINE.match(line):
            raise SiteLineError(f"{where}: must be a {self.name} option starting with '-', got {line!r}")
        option = re.split(r"[\s=]", line, maxsplit=1)[0]
        for bad in self.forbidden_options:
            attached = self.attached_values and len(bad) == 2 and option.startswith(bad) and option[1] != "-"
            if option == bad or attached:
                raise SiteLineError(f"{where}: {bad} is not allowed in a site line ({self.why_forbidden(bad)}), "
                                    f"got {line!r}")
        return line

    def why_forbidden(self, option: str) -> str:
        return "larscale writes it itself"

    def script_lines(self) -> list[str]:
        """Shell lines at the top of the script body (before the profile's setup)."""
        return []

    def submit_argv(self, script: str, after: tuple[str, ...] = ()) -> tuple[list[str], bool]:
        """(argv, script_on_stdin) that submits ``script`` from the sweep directory, to start once the jobs
        ``after`` have ended (whatever their exit: each resumes from the last checkpoint)."""
        raise NotImplementedError(f"scheduler {self.name} does not submit jobs")

    def parse_job_id(self, stdout: str) -> str:
        raise ValueError(f"scheduler {self.name!r} has no job ids")

    def query(self, job_ids: list[str], run: Runner) -> States:
        """The states of all these jobs, in as few scheduler commands as the scheduler allows (one)."""
        return {}

    def hosts_command(self) -> str | None:
        """A shell command that prints the allocation's hosts, one per line, each once (None: this host)."""
        return None

    def first_host(self) -> str:
        """A shell word for the allocation's first host (where the batch script runs)."""
        return "$(hostname)"


def job_id_or_error(scheduler: str, job_id: str, stdout: str) -> str:
    """A job id that must be one non-empty word (it goes into squeue/qstat arguments and file names)."""
    if not job_id or any(c.isspace() for c in job_id):
        raise SubmitError(f"cannot read a job id from the {scheduler} submission output {stdout!r}")
    return job_id


SCHEDULERS: dict[str, type[Scheduler]] = {}


def scheduler(cls: type[Scheduler]) -> type[Scheduler]:
    """Register a scheduler class under its ``name``."""
    SCHEDULERS[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def scheduler_names() -> tuple[str, ...]:
    return tuple(SCHEDULERS)


def get_scheduler(name: str) -> Scheduler:
    try:
        return SCHEDULERS[name]()
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}") from None


_load_all()
