"""local: the script runs here, in the foreground, one job after another (jobs/submit.py runs it with bash)."""

from __future__ import annotations

from jobs.schedulers import Scheduler, scheduler


@scheduler
class Local(Scheduler):
    name = "local"
    runs_here = True
    min_poll_s = 0.0     # nothing to query: the run's own files say everything

    def submit_argv(self, script: str, after: tuple[str, ...] = ()) -> tuple[list[str], bool]:
        return ["bash", script], False

    def first_host(self) -> str:
        return "127.0.0.1"
