"""Acks in batches: a flusher thread completes every job the worker threads finished since its last call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from dramatiq.logging import get_logger

from broker.errors import ConnectionClosed
from broker.messages import JobProxy
from broker.supervision import SupervisedThread, ThreadStatus
from broker.transport import Transport

#: Most claims completed in one call.
MAX_BATCH = 512
#: Seconds between attempts while the database is unreachable.
RETRY_DELAY_S = 1.0
#: Seconds close() keeps trying to flush the last acks before leaving them to the rescue.
CLOSE_FLUSH_S = 3.0
#: Seconds the idle flusher waits for work before ticking (its sign of life for /health).
IDLE_TICK_S = 1.0


class AckBatcher:
    """Worker threads hand finished jobs here and move on; one thread completes them in batches.

    Like RabbitMQ's acks, ours do not make the worker thread wait for the round trip: the flusher makes one
    call and one commit for every ack that arrived meanwhile. A job stays held until its completion commits,
    so its lease is extended while it waits (a slow flush never lets another worker rerun it); `done` is
    called for each job once its batch committed, or once it is given up. A lost connection is retried here
    until the database answers; a process that dies first leaves those jobs processing, and the rescue runs
    them again: at least once, as with any crash before an ack.
    """

    def __init__(self, transport: Transport, done: Callable[[JobProxy], None]) -> None:
        self.logger = get_logger(__name__, type(self))
        self.transport = transport
        self.done = done
        self._cond = threading.Condition()
        self._pending: list[JobProxy] = []
        self._in_flight = 0
        self._stopping = threading.Event()
        self._thread: SupervisedThread | None = None

    def complete(self, proxy: JobProxy) -> None:
        """Queue a finished job for completion; returns at once."""
        with self._cond:
            if self._thread is None:
                self._thread = SupervisedThread(
                    "queue-acks", self._run, stopping=self._stopping, stale_after_s=IDLE_TICK_S * 10
                )
                self._thread.start()
            self._pending.append(proxy)
            self._cond.notify()

    def status(self) -> ThreadStatus | None:
        return None if self._thread is None else self._thread.status()

    def close(self, timeout_s: float = CLOSE_FLUSH_S) -> None:
        """Flush what is queued (retrying for up to timeout_s), then stop the flusher."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._pending or self._in_flight) and self._thread is not None and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.logger.warning(
                        "%d acked job(s) not completed before shutdown; the rescue will run them again.",
                        len(self._pending) + self._in_flight,
                    )
                    break
                self._cond.wait(remaining)
            self._stopping.set()
            self._cond.notify_all()

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                if self._thread is not None:
                    self._thread.tick()
                if not self._pending:
                    self._cond.wait(IDLE_TICK_S)
                    continue
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._in_flight = len(batch)
            try:
                self._flush(batch)
            finally:
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()

    def _flush(self, batch: list[JobProxy]) -> None:
        while True:
            try:
                completed = self.transport.complete_many([proxy.claim for proxy in batch])
            except ConnectionClosed as exc:
                if self._stopping.is_set():
                    return
                self.logger.warning("Could not complete %d job(s), retrying: %s", len(batch), exc)
                if self._thread is not None:
                    self._thread.tick()
                self._stopping.wait(RETRY_DELAY_S)
                continue
            except Exception:
                self.logger.exception(
                    "Could not complete %d job(s); letting them go, the rescue will run them again.",
                    len(batch),
                )
                completed = set()
            for proxy in batch:
                if proxy.claim.job_id not in completed:
                    self.logger.warning(
                        "Job %s finished after its claim was lost; it was not completed by this worker.",
                        proxy.claim.job_id,
                    )
                self.done(proxy)
            return
