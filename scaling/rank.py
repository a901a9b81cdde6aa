"""What every rank has once it is up: who it is, a stop flag for SIGTERM/SIGUSR1, and a watchdog on collectives.

Stopping: SIGTERM and SIGUSR1 (Slurm sends one before the walltime) set a flag. At every step boundary the ranks
sum their flags (scaling/loop.py), and all stop at the same boundary. A rank blocked in a collective for longer
than ``--stall-timeout`` (a peer died or hangs) exits with status 70 through the watchdog thread, so no launcher
set-up can leave the survivors waiting forever.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from larscale.runformat import EXIT_STALLED


@dataclass
class RankInfo:
    rank: int
    ranks: int
    local_rank: int
    local_size: int
    controller: str
    host: str = field(default_factory=socket.gethostname)


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def log(rank: int, message: str) -> None:
    """One line on rank 0's standard output (the other ranks stay quiet: a line per job, not per rank)."""
    if rank == 0:
        print(f"larscale train: {message}", flush=True)


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the handler only records the signal (safe at any point of the step)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def local(self) -> bool:
        return self.event.is_set()


class Watchdog:
    """Kills this rank when it has been blocked in one collective longer than its timeout.

    The main thread wraps every blocking collective in ``with watchdog.waiting("what", timeout)``. A peer that
    died or hangs leaves the others blocked there forever under launchers that do not tear the job down
    (``mpirun`` and ``horovodrun`` do; ``srun`` without ``--kill-on-bad-exit`` does not). Compute time is not
    watched, so a slow step is never mistaken for a dead peer.
    """

    def __init__(self, rank: int, on_expire: Callable[[str, float], None] | None = None) -> None:
        self.rank = rank
        self.on_expire = on_expire
        self._lock = threading.Lock()
        self._what: str | None = None
        self._deadline = math.inf
        self._since = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="larscale-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    @contextlib.contextmanager
    def waiting(self, what: str, timeout: float) -> Iterator[None]:
        self.arm(what, timeout)
        try:
            yield
        finally:
            self.disarm()

    def arm(self, what: str, timeout: float) -> None:
        """Watch from now: a collective that does not return within ``timeout`` is a dead or hung peer. For waits
        that are not one call (DDP arms it at each gradient bucket's launch inside backward)."""
        now = time.monotonic()
        with self._lock:
            self._what, self._since, self._deadline = what, now, now + timeout

    def disarm(self) -> None:
        with self._lock:
            self._what, self._deadline = None, math.inf

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                what, since, expired = self._what, self._since, time.monotonic() > self._deadline
            if expired and what is not None:
                waited = time.monotonic() - since
                print(f"larscale train: rank {self.rank}: blocked {waited:.0f} s in {what}; a peer rank died or "
                      "hangs. Exiting.", file=sys.stderr, flush=True)
                if self.on_expire is not None:
                    with contextlib.suppress(Exception):
                        self.on_expire(what, waited)
                os._exit(EXIT_STALLED)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class RankStart:
    """What every rank has once the communicator, the device, the watchdog and the stop flag are up."""

    info: RankInfo
    device: Any                 # scaling.framework.DeviceSummary
    watchdog: Watchdog
    hosts: list[str]            # per rank
    local_sizes: list[int]      # per rank: ranks on its node
    stop: StopFlag
    started_at: str
    startup_timeout: float      # collectives before the first step wait for slow starters this long


def start_rank(comm: Any, setup_device: Callable[[RankInfo], Any], stall_timeout: float,
               stop: StopFlag) -> RankStart:
    """The start-up every run shares: join the job, set up the device, start the watchdog, learn the topology.
    ``stop`` was installed before anything heavy was imported (a stop signal during start-up is a stop request)."""
    info = comm.start()
    started_at = utc_now()
    device = setup_device(info)
    watchdog = Watchdog(info.rank).start()
    startup_timeout = max(300.0, 5 * stall_timeout)
    # Hosts and ranks per node, gathered up front so even a failure summary describes the job; after the device
    # set-up because TensorFlow fixes its thread pools at its first op.
    with watchdog.waiting("topology gather", startup_timeout):
        topology = comm.allgather_object((info.host, info.local_size), name="larscale.topology")
    return RankStart(info, device, watchdog, [t[0] for t in topology], [t[1] for t in topology], stop, started_at,
                     startup_timeout)
