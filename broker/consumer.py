"""The consumer: claims batches of one queue's jobs and hands them to Dramatiq one at a time."""

from __future__ import annotations

import contextlib
import heapq
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from dramatiq.broker import Consumer, MessageProxy
from dramatiq.logging import get_logger

from broker.errors import ConnectionClosed
from broker.messages import JobProxy, UndecodableJob, decode, error_text
from broker.transport import Claim

if TYPE_CHECKING:
    from broker.broker import SupabaseBroker

#: Seconds to wait past a delayed job's run_at before claiming it: absorbs small clock skew with the database.
DUE_MARGIN_S = 0.05


class JobConsumer(Consumer):
    """Consumes one queue. `__next__` runs on the consumer thread; ack and nack on worker threads.

    A claim asks for as many jobs as the prefetch allows, so a busy worker makes one round trip per batch.
    It claims when the doorbell rings, when a delayed job falls due, when the poll interval passes, and at
    once again when the last batch came back full and capacity frees up.
    """

    def __init__(self, broker: SupabaseBroker, queue_name: str, prefetch: int, timeout_ms: int) -> None:
        self.logger = get_logger(__name__, type(self))
        self.broker = broker
        self.transport = broker.transport
        self.queue_name = queue_name
        self.prefetch = max(prefetch, 1)
        self.timeout_s = timeout_ms / 1000
        self._buffer: deque[JobProxy] = deque()
        self._cond = threading.Condition()
        self._kick = True  # claim at once on start
        self._more = False  # the last claim came back full
        self._due_s: list[float] = []  # epoch seconds at which delayed jobs fall due
        self._next_poll = 0.0  # monotonic seconds
        #: Capacity to wait for before claiming again after a full batch: claims stay batches.
        self._refill_at = max(1, self.prefetch // 2)
        broker.register_consumer(self)

    # -- the doorbell's side --------------------------------------------------------------------------
    def ring(self, run_at_ms: int) -> None:
        """Wake this consumer: jobs are due now, or at run_at_ms."""
        with self._cond:
            if run_at_ms <= time.time() * 1000:
                self._kick = True
            else:
                heapq.heappush(self._due_s, run_at_ms / 1000 + DUE_MARGIN_S)
                del self._due_s[256:]  # a hint; the poll covers the rest
            self._cond.notify()

    # -- the consumer thread's side -------------------------------------------------------------------
    def __next__(self) -> MessageProxy | None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.broker.last_tick = time.time()
            if self._buffer:
                return self._buffer.popleft()
            if self._should_claim():
                self._claim()
                if self._buffer:
                    continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._wait(remaining)

    def _capacity(self) -> int:
        return self.prefetch - self.broker.held_count(self.queue_name)

    def _should_claim(self) -> bool:
        capacity = self._capacity()
        if not self.broker.claiming or capacity < 1:
            return False
        if self._more and capacity >= self._refill_at:
            return True  # the last batch came back full: more is waiting, claim a batch's worth at once
        with self._cond:
            if self._kick or time.monotonic() >= self._next_poll:
                return True
            return bool(self._due_s) and self._due_s[0] <= time.time()

    def _wait(self, remaining_s: float) -> None:
        with self._cond:
            if self._should_claim():
                return
            timeout = remaining_s
            # Poll and due times only matter with room to claim; otherwise an ack or a ring wakes us.
            if self.broker.claiming and self._capacity() >= 1:
                timeout = min(timeout, max(self._next_poll - time.monotonic(), 0.0))
                if self._due_s:
                    timeout = min(timeout, max(self._due_s[0] - time.time(), 0.0))
            self._cond.wait(timeout)

    def _claim(self) -> None:
        limit = self._capacity()
        with self._cond:
            self._kick = False
            now = time.time()
            while self._due_s and self._due_s[0] <= now:
                heapq.heappop(self._due_s)
        jobs = self.transport.claim(self.broker.worker_id, self.queue_name, limit, self.broker.lease_ms)
        self._more = len(jobs) >= limit
        self._next_poll = time.monotonic() + self.broker.poll_interval_s
        for job in jobs:
            try:
                proxy = decode(job)
            except UndecodableJob as exc:
                self._dead_letter_undecodable(Claim(job.id, job.claim_token), str(exc))
                continue
            self.broker.hold(proxy)
            self._buffer.append(proxy)

    def _dead_letter_undecodable(self, claim: Claim, reason: str) -> None:
        self.logger.error("Job %s does not decode and is dead-lettered: %s", claim.job_id, reason)
        self.transport.dead_letter(claim, f"payload does not decode: {reason}")

    # -- worker threads' side -------------------------------------------------------------------------
    def ack(self, message: MessageProxy) -> None:
        proxy = _job(message)
        proxy.finishing = True
        if proxy.pending_retry is not None:
            self.broker.send_pending_retry(proxy)  # its run failed: this "ack" is the retry Retries asked for
            return
        if not proxy.settled:
            self.broker.acks.complete(proxy.claim)
        self.broker.forget(proxy)

    def nack(self, message: MessageProxy) -> None:
        proxy = _job(message)
        proxy.finishing = True
        if not proxy.settled and not self.transport.dead_letter(proxy.claim, error_text(message)):
            self.logger.warning("Job %s failed after its lease was lost.", proxy.claim.job_id)
        self.broker.forget(proxy)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        proxies = [_job(m) for m in messages]
        self._release(proxies)

    def capacity_freed(self) -> None:
        """Called when a held job is let go: a consumer waiting for room may claim again."""
        with self._cond:
            self._cond.notify()

    def _release(self, proxies: list[JobProxy]) -> None:
        pending = [p for p in proxies if not p.settled]
        if not pending:
            return
        try:
            released = self.transport.release([p.claim for p in pending])
        except ConnectionClosed:
            self.logger.warning("Could not release %d job(s); their leases will return them.", len(pending))
            raise
        self.logger.info(
            "Released %d prefetched job(s) of queue %r back to pending.", released, self.queue_name
        )
        for proxy in pending:
            proxy.settled = True
            self.broker.forget(proxy)

    def close(self) -> None:
        """Release what was claimed but never handed to Dramatiq."""
        buffered = list(self._buffer)
        self._buffer.clear()
        with contextlib.suppress(ConnectionClosed):
            self._release(buffered)
        self.broker.unregister_consumer(self)


def _job(message: MessageProxy) -> JobProxy:
    if not isinstance(message, JobProxy):
        raise TypeError(f"expected a message claimed from the queue, got {type(message).__name__}")
    return message
