"""The consumer: claims batches of one queue's jobs and hands them to Dramatiq one at a time."""

from __future__ import annotations

import heapq
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from dramatiq.broker import Consumer, MessageProxy
from dramatiq.logging import get_logger

from broker.claim_ahead import HAND_BACK_AFTER_S
from broker.errors import ConnectionClosed
from broker.holdings import Holdings
from broker.messages import JobProxy, UndecodableJob, decode, error_text
from broker.settle import Settler
from broker.transport import Claim, ClaimedJob, Transport

#: Seconds to wait past a delayed job's run_at before claiming it: absorbs small clock skew with the database.
DUE_MARGIN_S = 0.05
#: Seconds between claim attempts while the queue is unreachable: at once, then backing off.
CLAIM_RETRY_BACKOFF_S = (0.05, 0.2, 0.5, 1.0, 2.0)
#: Milliseconds an unknown actor's job waits before it is offered again (a rolling deploy may bring its code).
UNKNOWN_ACTOR_RETRY_MS = 10_000
#: The option recording since when workers have not known a job's actor (epoch milliseconds).
UNKNOWN_SINCE_OPTION = "unknown_actor_since_ms"


class ConsumerHost(Protocol):
    """What a consumer needs from its broker."""

    transport: Transport
    holdings: Holdings
    settler: Settler
    worker_id: str
    lease_ms: int
    poll_interval_s: float
    #: Milliseconds a job of an actor no worker here knows is offered again before it fails.
    unknown_actor_grace_ms: int
    last_tick: float

    def may_claim(self) -> bool: ...

    def capacity(self, queue_name: str, prefetch: int) -> int: ...

    def may_wait(self) -> int | None:
        """Claimed jobs that may wait for a thread without going back to the queue; None: any number."""

    def knows_actor(self, actor_name: str) -> bool: ...

    def claimed(self, proxies: list[JobProxy], sent_at: float) -> None: ...

    def send_pending_retry(self, proxy: JobProxy) -> None: ...

    def settle_interrupted(self, proxy: JobProxy) -> None: ...


class JobConsumer(Consumer):
    """Consumes one queue. `__next__` runs on the consumer thread; ack and nack on worker threads.

    A claim asks for as many jobs as there is room for, so a busy worker makes one round trip per batch. It
    claims when the doorbell rings, when a delayed job falls due, when the poll interval passes, and at once
    again when the last batch came back full and room frees up. A lost connection is routine: the claim is
    repeated with the same claim token (so a claim whose reply was lost is not claimed twice) after a short
    backoff, and the consumer keeps running, with no restart and no CRITICAL line.
    """

    def __init__(self, broker: ConsumerHost, queue_name: str, prefetch: int, timeout_ms: int) -> None:
        self.logger = get_logger(__name__, type(self))
        self.broker = broker
        self.transport = broker.transport
        self.settler = broker.settler
        self.queue_name = queue_name
        self.prefetch = max(prefetch, 1)
        self.timeout_s = timeout_ms / 1000
        self._buffer: deque[JobProxy] = deque()
        self._cond = threading.Condition()
        self._kick = True  # claim at once on start
        self._more = False  # the last claim came back full
        self._due_s: list[float] = []  # epoch seconds at which delayed jobs fall due
        self._next_poll = 0.0  # monotonic seconds
        self._claim_token: str | None = None  # kept until a claim gets an answer
        self._failures = 0
        self._retry_at = 0.0  # monotonic seconds
        #: Monotonic time at which a job claimed ahead may have to go back to the queue; None: none can.
        self._hand_back_at: float | None = None
        #: Room to wait for before claiming again after a full batch: claims stay batches.
        self._refill_at = max(1, self.prefetch // 2)
        self._capacity_freed: Callable[[], None] = self.capacity_freed
        broker.holdings.on_freed(queue_name, self._capacity_freed)

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

    def capacity_freed(self) -> None:
        """Called when a held job is let go or stops running: a consumer waiting for room may claim again."""
        with self._cond:
            self._cond.notify()

    # -- the consumer thread's side -------------------------------------------------------------------
    def __next__(self) -> MessageProxy | None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.broker.last_tick = time.time()
            self._hand_back_waiting()
            while self._buffer:
                proxy = self._buffer.popleft()
                if not proxy.settled:
                    return proxy
            if self._should_claim():
                self._claim()
                if self._buffer:
                    continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._wait(remaining)

    def _capacity(self) -> int:
        return self.broker.capacity(self.queue_name, self.prefetch)

    def _should_claim(self) -> bool:
        capacity = self._capacity()
        if capacity < 1 or not self.broker.may_claim() or time.monotonic() < self._retry_at:
            return False
        if self._more and capacity >= self._refill_at:
            return True  # the last batch came back full: more is waiting, claim a batch's worth at once
        with self._cond:
            if self._kick or time.monotonic() >= self._next_poll or self._claim_token is not None:
                return True
            return bool(self._due_s) and self._due_s[0] <= time.time()

    def _wait(self, remaining_s: float) -> None:
        with self._cond:
            if self._should_claim():
                return
            timeout = remaining_s
            # Poll, retry and due times only matter with room to claim; otherwise an ack or a ring wakes us.
            if self.broker.may_claim() and self._capacity() >= 1:
                now = time.monotonic()
                wake = max(self._next_poll, self._retry_at)
                if self._claim_token is not None:
                    wake = self._retry_at
                timeout = min(timeout, max(wake - now, 0.0))
                if self._due_s:
                    timeout = min(timeout, max(self._due_s[0] - time.time(), 0.0))
            if self._hand_back_at is not None and self.broker.may_wait() is not None:
                timeout = min(timeout, max(self._hand_back_at - time.monotonic(), 0.0))
            self._cond.wait(timeout)

    def _claim(self) -> None:
        limit = self._capacity()
        with self._cond:
            self._kick = False
            now = time.time()
            while self._due_s and self._due_s[0] <= now:
                heapq.heappop(self._due_s)
        if self._claim_token is None:
            self._claim_token = str(uuid.uuid4())
        sent_at = time.monotonic()
        try:
            jobs = self.transport.claim(
                self.broker.worker_id, self.queue_name, limit, self.broker.lease_ms, self._claim_token
            )
        except ConnectionClosed as exc:
            delay = CLAIM_RETRY_BACKOFF_S[min(self._failures, len(CLAIM_RETRY_BACKOFF_S) - 1)]
            self._failures += 1
            self._retry_at = time.monotonic() + delay
            self.logger.warning(
                "Claim on queue %r failed (%s); trying again in %.2f s.", self.queue_name, exc, delay
            )
            return
        if self._failures:
            self.logger.info("Claims on queue %r work again.", self.queue_name)
        self._failures = 0
        self._claim_token = None
        self._more = len(jobs) >= limit
        self._next_poll = time.monotonic() + self.broker.poll_interval_s
        self._take(jobs, sent_at)

    def _take(self, jobs: list[ClaimedJob], sent_at: float) -> None:
        """Hold what decodes and what this worker can run; settle the rest without holding it."""
        taken: list[JobProxy] = []
        for job in jobs:
            try:
                proxy = decode(job)
            except UndecodableJob as exc:
                self._refuse(job, f"payload does not decode: {exc}")
                continue
            proxy.claimed_at = sent_at
            self.broker.holdings.hold(proxy)
            if self._hand_back_at is None:
                self._hand_back_at = sent_at + HAND_BACK_AFTER_S
            if not self.broker.knows_actor(proxy.actor_name):
                self._postpone_unknown(proxy, job)
                continue
            taken.append(proxy)
        self.broker.claimed(taken, sent_at)
        self._buffer.extend(taken)

    def _hand_back_waiting(self) -> None:
        """Claimed jobs beyond what may wait that found no free thread in time go back (claim_ahead.py)."""
        allowed = self.broker.may_wait()
        now = time.monotonic()
        if allowed is None or self._hand_back_at is None or now < self._hand_back_at:
            return
        waiting = self.broker.holdings.waiting(self.queue_name)  # oldest claim first
        stale = [p for p in waiting if p.claimed_at <= now - HAND_BACK_AFTER_S]
        remaining = stale[:allowed] + waiting[len(stale) :]
        # Look again when the first job beyond those that may wait turns stale (a claim sets it sooner).
        self._hand_back_at = (
            remaining[allowed].claimed_at + HAND_BACK_AFTER_S if len(remaining) > allowed else None
        )
        waiting = self.broker.holdings.take_back(stale[allowed:])
        if not waiting:
            return
        try:
            released = self.settler.release(waiting)
        except ConnectionClosed as exc:
            # Let go, not extended: the heartbeat hands back jobs claimed for this worker but not held.
            self.logger.warning("Could not hand back %d job(s) (%s); they will come back.", len(waiting), exc)
            for proxy in waiting:
                self.settler.let_go(proxy)
            return
        self.logger.info(
            "Handed back %d job(s) of queue %r claimed ahead: no thread freed up within %.0f ms.",
            released,
            self.queue_name,
            HAND_BACK_AFTER_S * 1000,
        )

    def _refuse(self, job: ClaimedJob, reason: str) -> None:
        self.logger.error("Job %s is dead-lettered: %s", job.id, reason)
        try:
            self.transport.dead_letter(Claim(job.id, job.claim_token), reason)
        except Exception as exc:
            # Not held, so not extended: the worker's heartbeat hands it back and it is tried again.
            self.logger.warning("Could not dead-letter job %s (%s); it will come back.", job.id, exc)

    def _postpone_unknown(self, proxy: JobProxy, job: ClaimedJob) -> None:
        options = job.options if isinstance(job.options, dict) else {}
        now_ms = int(time.time() * 1000)
        since_ms = options.get(UNKNOWN_SINCE_OPTION)
        since_ms = since_ms if isinstance(since_ms, int) and not isinstance(since_ms, bool) else now_ms
        waited_ms = now_ms - since_ms
        try:
            if waited_ms >= self.broker.unknown_actor_grace_ms:
                self.logger.error(
                    "Job %s is dead-lettered: no worker knows actor %r (waited %d s).",
                    job.id,
                    job.actor_name,
                    waited_ms // 1000,
                )
                self.settler.dead_letter(
                    proxy, f"no worker knows actor {job.actor_name!r} (offered for {waited_ms // 1000} s)"
                )
                return
            self.logger.warning(
                "Job %s names actor %r, which this worker does not know; offering it again in %d s.",
                job.id,
                job.actor_name,
                UNKNOWN_ACTOR_RETRY_MS // 1000,
            )
            note = f"waiting for a worker that knows actor {job.actor_name!r}"
            self.settler.postpone(
                proxy, UNKNOWN_ACTOR_RETRY_MS, note, {**options, UNKNOWN_SINCE_OPTION: since_ms}
            )
        except ConnectionClosed as exc:
            self.logger.warning("Could not put back job %s (%s); it will come back.", job.id, exc)
            self.settler.let_go(proxy)

    # -- worker threads' side -------------------------------------------------------------------------
    def ack(self, message: MessageProxy) -> None:
        proxy = _job(message)
        if proxy.skipped and proxy.interrupted is None:
            return  # it never ran here: whoever took it from this worker (a hand-back, a drop) settles it
        proxy.finishing = True
        if proxy.pending_retry is not None:
            self.broker.send_pending_retry(proxy)  # its run failed: this "ack" is the retry Retries asked for
        elif proxy.interrupted is not None and not proxy.settled:
            self.broker.settle_interrupted(proxy)
        elif not proxy.settled:
            self.settler.complete(proxy)

    def nack(self, message: MessageProxy) -> None:
        proxy = _job(message)
        if proxy.skipped and proxy.interrupted is None:
            return  # never ran here, as in ack
        proxy.finishing = True
        if proxy.interrupted is not None and not proxy.settled:
            self.broker.settle_interrupted(proxy)
        elif not proxy.settled:
            self.settler.dead_letter(proxy, error_text(message))

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        proxies = [_job(m) for m in messages]
        released = self.settler.release(proxies)
        if released:
            self.logger.info(
                "Released %d prefetched job(s) of queue %r back to pending.", released, self.queue_name
            )

    def close(self) -> None:
        """Release what was claimed but never handed to Dramatiq."""
        buffered = list(self._buffer)
        self._buffer.clear()
        try:
            self.requeue(buffered)
        except ConnectionClosed:
            self.logger.warning("Could not release %d buffered job(s); they will come back.", len(buffered))
            for proxy in buffered:
                self.settler.let_go(proxy)
        self.broker.holdings.off_freed(self.queue_name, self._capacity_freed)


def _job(message: MessageProxy) -> JobProxy:
    if not isinstance(message, JobProxy):
        raise TypeError(f"expected a message claimed from the queue, got {type(message).__name__}")
    return message
