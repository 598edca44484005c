"""Retention: each worker process prunes old finished jobs now and then; one at a time, in small batches.

`prune_jobs()` deletes completed and cancelled jobs older than one age and failed ones older than another,
oldest first, a batch at a time, and takes a try-lock so that of all the workers only one prunes at any
moment (the others return at once). It touches finished rows only and skips locked ones, so claims never
wait for it. A worker calls it every PRUNE_EVERY_S, and again soon while a call came back full (a backlog,
such as the first prune of a queue that never had retention).
"""

from __future__ import annotations

import threading

from dramatiq.logging import get_logger

from broker.errors import ConnectionClosed, QueueError
from broker.supervision import SupervisedThread, ThreadStatus
from broker.transport import Transport

#: Seconds between prunes of one worker process (with many workers, someone prunes far more often).
PRUNE_EVERY_S = 60.0
#: Seconds after start-up before a worker's first prune, so a fleet starting together spreads its calls.
FIRST_PRUNE_AFTER_S = 10.0
#: Seconds between calls while a backlog is being pruned.
BACKLOG_PAUSE_S = 1.0
#: Milliseconds in a day, for the retention settings given in days.
MS_PER_DAY = 86_400_000


def retention_ms(days: int) -> int | None:
    """A retention in days as the milliseconds prune_jobs takes; 0 days means keep forever (None)."""
    return days * MS_PER_DAY if days > 0 else None


class Pruner:
    """A supervised thread that calls `transport.prune(completed_ms, failed_ms)` now and then."""

    def __init__(
        self,
        transport: Transport,
        *,
        completed_ms: int | None,
        failed_ms: int | None,
        every_s: float = PRUNE_EVERY_S,
        first_after_s: float = FIRST_PRUNE_AFTER_S,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.transport = transport
        self.completed_ms = completed_ms
        self.failed_ms = failed_ms
        self.every_s = every_s
        self.first_after_s = first_after_s
        self._stopping = threading.Event()
        self._thread = SupervisedThread(
            "queue-retention", self._loop, stopping=self._stopping, stale_after_s=max(every_s * 3, 60.0)
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def status(self) -> ThreadStatus:
        return self._thread.status()

    def _loop(self) -> None:
        wait_s = self.first_after_s
        while not self._stopping.wait(wait_s):
            self._thread.tick()
            wait_s = self.every_s
            try:
                result = self.transport.prune(self.completed_ms, self.failed_ms)
            except (ConnectionClosed, QueueError) as exc:
                self.logger.warning("Pruning old jobs failed: %s", exc)
                continue
            if result.deleted:
                self.logger.info("Pruned %d finished job(s) past their retention.", result.deleted)
            if result.more:
                wait_s = BACKLOG_PAUSE_S
