"""Acks in batches: a flusher thread completes every job the worker threads finished since its last call."""

from __future__ import annotations

import threading
import time

from dramatiq.logging import get_logger

from broker.errors import ConnectionClosed, QueueError
from broker.transport import Claim, Transport

#: Most claims completed in one call.
MAX_BATCH = 512
#: Seconds between attempts while the database is unreachable.
RETRY_DELAY_S = 1.0
#: Seconds close() keeps trying to flush the last acks before leaving them to the lease rescue.
CLOSE_FLUSH_S = 10.0


class AckBatcher:
    """Worker threads hand finished jobs here and move on; one thread completes them in batches.

    Like RabbitMQ's acks, ours do not wait for the round trip: the worker thread is free for its next job
    while the flusher makes one call and one commit for every ack that arrived meanwhile. A lost
    connection is retried here until the database answers; a process that dies first leaves its acked
    jobs processing, and the lease rescue runs them again -- at least once, as with any crash before an ack.
    """

    def __init__(self, transport: Transport) -> None:
        self.logger = get_logger(__name__, type(self))
        self.transport = transport
        self._cond = threading.Condition()
        self._pending: list[Claim] = []
        self._in_flight = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    def complete(self, claim: Claim) -> None:
        """Queue a finished job for completion; returns at once."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="queue-acks", daemon=True)
                self._thread.start()
            self._pending.append(claim)
            self._cond.notify()

    def unflushed(self) -> int:
        """Acks not yet committed."""
        with self._cond:
            return len(self._pending) + self._in_flight

    def close(self, timeout_s: float = CLOSE_FLUSH_S) -> None:
        """Flush what is queued (retrying for up to timeout_s), then stop the flusher."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._stopping = True
            self._cond.notify()
            while (self._pending or self._in_flight) and self._thread is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.logger.warning(
                        "%d acked job(s) not completed before shutdown; the lease rescue will rerun them.",
                        len(self._pending) + self._in_flight,
                    )
                    return
                self._cond.wait(remaining)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._in_flight = len(batch)
            self._flush(batch)
            with self._cond:
                self._in_flight = 0
                self._cond.notify_all()

    def _flush(self, batch: list[Claim]) -> None:
        while True:
            try:
                completed = self.transport.complete_many(batch)
            except ConnectionClosed as exc:
                self.logger.warning("Could not complete %d job(s), retrying: %s", len(batch), exc)
                time.sleep(RETRY_DELAY_S)
                continue
            except QueueError:
                self.logger.exception(
                    "Could not complete %d job(s); their leases will return them.", len(batch)
                )
                return
            for claim in batch:
                if claim.job_id not in completed:
                    self.logger.warning(
                        "Job %s finished after its lease was lost; another worker may run it again.",
                        claim.job_id,
                    )
            return
