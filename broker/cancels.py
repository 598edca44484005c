"""Cancelling held jobs: a request arrives, the actor is told, and a job that goes on running is stopped.

A request reaches the worker that holds the job by the doorbell (`{"cancel": <id>}` on the LISTEN channel, or
a Realtime `cancel` Broadcast) within milliseconds, or else by its next heartbeat (`cancel_requested`), so
none is lost to a dropped connection or a poll-only worker. From then on `should_stop()` says True in the
job's thread; if the actor is still running CANCEL_GRACE_S later, JobCancelled is raised in its thread, the
way Dramatiq's TimeLimit stops a job. However it ends, the broker settles it as cancelled (fenced by its
claim), never retried; a job that had not started yet is skipped when its turn comes.
"""

from __future__ import annotations

import threading
import time

from dramatiq.logging import get_logger

from broker.holdings import Holdings
from broker.interrupts import JobCancelled
from broker.messages import JobProxy

#: Seconds an actor has to stop by itself once should_stop() says so, before JobCancelled is raised.
CANCEL_GRACE_S = 0.25


class Cancellations:
    """Thread-safe: the doorbell and the heartbeat request, the watchdog enforces."""

    def __init__(self, holdings: Holdings, grace_s: float = CANCEL_GRACE_S) -> None:
        self.logger = get_logger(__name__, type(self))
        self.holdings = holdings
        self.grace_s = grace_s
        self._lock = threading.Lock()
        #: job id -> (the held job, monotonic time after which it is interrupted)
        self._stopping: dict[str, tuple[JobProxy, float]] = {}

    def request(self, job_id: str) -> bool:
        """The job's cancellation was asked for; True when this worker holds it (and will stop it)."""
        proxy = self.holdings.find(job_id)
        if proxy is None or proxy.settled or proxy.finishing:
            return False
        if not self.holdings.mark(proxy, JobCancelled):
            return proxy.interrupted is JobCancelled
        with self._lock:
            self._stopping[job_id] = (proxy, time.monotonic() + self.grace_s)
        self.logger.info(
            "Job %s (%s): cancellation asked for; %s.",
            job_id,
            proxy.actor_name,
            "stopping it" if self.holdings.is_running(proxy) else "it will not run",
        )
        return True

    def check(self, now: float | None = None) -> None:
        """Interrupt the cancelled jobs still running past their grace (the watchdog calls this; no I/O)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            due = [(job_id, proxy) for job_id, (proxy, at) in self._stopping.items() if now >= at]
            for job_id, _ in due:
                del self._stopping[job_id]
        for job_id, proxy in due:
            if not proxy.settled and self.holdings.interrupt(proxy, JobCancelled):
                self.logger.warning(
                    "Job %s (%s) did not stop within %.1f s of its cancellation; interrupting it.",
                    job_id,
                    proxy.actor_name,
                    self.grace_s,
                )
