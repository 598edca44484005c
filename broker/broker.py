"""SupabaseBroker: Dramatiq's broker contract over the coding_jobs queue functions."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any

import dramatiq
from dramatiq.errors import QueueJoinTimeout
from dramatiq.message import Message
from dramatiq.middleware import Middleware, default_middleware
from dramatiq.middleware.retries import Retries

from broker.acks import AckBatcher
from broker.consumer import JobConsumer
from broker.defaults import DEFAULT_LEASE_MS, DEFAULT_MAX_RETRIES, DEFAULT_POLL_INTERVAL_MS
from broker.errors import ConnectionClosed
from broker.leases import LeaseKeeper
from broker.messages import JobProxy, error_text, new_job, stored_options
from broker.transport import Doorbell, Transport

#: Statuses that mean a queue still has work, for join().
ACTIVE_STATUSES = frozenset({"pending", "processing"})


def default_worker_id() -> str:
    """host:pid:random, so operators can tell which process holds a job."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class SupabaseBroker(dramatiq.Broker):
    """A Dramatiq broker whose every state change is a call to the queue's SQL functions.

    Delays never reach the worker's in-memory delay queue: a delayed message is a row whose run_at is later,
    and a retry reschedules the same row.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        middleware: list[Middleware] | None = None,
        worker_id: str | None = None,
        lease_ms: int = DEFAULT_LEASE_MS,
        poll_interval_ms: int = DEFAULT_POLL_INTERVAL_MS,
        max_retries: int = DEFAULT_MAX_RETRIES,
        claim_ahead: int | None = None,
    ) -> None:
        if middleware is None:
            middleware = [m() for m in default_middleware if m is not Retries]
            middleware.insert(0, Retries(max_retries=max_retries))
        super().__init__(middleware=middleware)
        self.transport = transport
        self.queues: set[str] = set()
        self.worker_id = worker_id or default_worker_id()
        self.lease_ms = lease_ms
        #: Jobs a worker process may hold beyond its threads, across all its queues; None keeps Dramatiq's
        #: per-queue prefetch (twice the threads), which suits short jobs best.
        self.claim_ahead = claim_ahead
        self._worker_threads: int | None = None
        self.poll_interval_s = poll_interval_ms / 1000
        #: time.time() of the last consumer iteration: the health check's sign of life.
        self.last_tick = time.time()
        self._lock = threading.Lock()
        #: Acks from all worker threads, completed in batches.
        self.acks = AckBatcher(transport)
        self._held: dict[str, JobProxy] = {}
        self._held_by_queue: Counter[str] = Counter()
        self._consumers: dict[str, list[JobConsumer]] = {}
        self._doorbell: Doorbell | None = None
        #: Cleared at worker shutdown: consumers stop claiming while running jobs finish.
        self.claiming = True
        self._leases: LeaseKeeper | None = None

    # -- Dramatiq's contract ----------------------------------------------------------------------------
    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> JobConsumer:
        self._start_background()
        return JobConsumer(self, queue_name, self.prefetch_for(prefetch), timeout)

    def prefetch_for(self, prefetch: int) -> int:
        """How many jobs one consumer may hold: Dramatiq's prefetch, or the threads plus claim_ahead."""
        if self.claim_ahead is None or self._worker_threads is None:
            return prefetch
        return max(1, self._worker_threads + self.claim_ahead)

    def declare_queue(self, queue_name: str) -> None:
        if queue_name not in self.queues:
            self.emit_before("declare_queue", queue_name)
            self.queues.add(queue_name)
            self.emit_after("declare_queue", queue_name)

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        if isinstance(message, JobProxy) and self.holds(message):
            return self._retry(message, delay or 0)
        self.emit_before("enqueue", message, delay)
        self.transport.enqueue(
            [new_job(message, default_max_retries=self._max_retries(message), delay_ms=delay or 0)]
        )
        self.emit_after("enqueue", message, delay)
        return message

    def get_declared_queues(self) -> set[str]:
        return self.queues.copy()

    def flush(self, queue_name: str) -> None:
        self.transport.purge(queue_name)

    def flush_all(self) -> None:
        for queue_name in self.queues:
            self.flush(queue_name)

    def join(self, queue_name: str, *, interval: int = 100, timeout: int | None = None) -> None:
        """Wait until the queue has no pending or processing jobs (tests and scripts)."""
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while any(s.queue_name == queue_name and s.status in ACTIVE_STATUSES for s in self.transport.stats()):
            if deadline is not None and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)
            time.sleep(interval / 1000)

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        if signal == "worker_boot":
            self._worker_threads = args[0].worker_threads
        elif signal == "worker_shutdown":
            self._stop_claiming()
        super().emit_before(signal, *args, **kwargs)

    def close(self) -> None:
        """Complete acked jobs, hand back those still running at the deadline, stop threads, disconnect."""
        self.acks.close()
        self._release_abandoned()
        if self._doorbell is not None:
            self._doorbell.stop()
        if self._leases is not None:
            self._leases.stop()
        self.transport.close()

    # -- held jobs ------------------------------------------------------------------------------------
    def hold(self, proxy: JobProxy) -> None:
        with self._lock:
            self._held[proxy.claim.job_id] = proxy
            self._held_by_queue[proxy.queue_name] += 1

    def forget(self, proxy: JobProxy) -> None:
        with self._lock:
            if self._held.pop(proxy.claim.job_id, None) is None:
                return
            self._held_by_queue[proxy.queue_name] -= 1
            consumers = list(self._consumers.get(proxy.queue_name, ()))
        for consumer in consumers:
            consumer.capacity_freed()

    def holds(self, proxy: JobProxy) -> bool:
        return self._held.get(proxy.claim.job_id) is proxy

    def held_count(self, queue_name: str) -> int:
        """Jobs held for this queue; with claim_ahead set, for every queue, since they share the threads."""
        if self.claim_ahead is not None:
            return len(self._held)
        return self._held_by_queue[queue_name]

    def held_jobs(self) -> list[JobProxy]:
        with self._lock:
            return list(self._held.values())

    def register_consumer(self, consumer: JobConsumer) -> None:
        with self._lock:
            self._consumers.setdefault(consumer.queue_name, []).append(consumer)

    def unregister_consumer(self, consumer: JobConsumer) -> None:
        with self._lock:
            consumers = self._consumers.get(consumer.queue_name, [])
            if consumer in consumers:
                consumers.remove(consumer)

    # -- internals ------------------------------------------------------------------------------------
    def _retry(self, proxy: JobProxy, delay_ms: int) -> Message[Any]:
        """Dramatiq's Retries re-enqueues the message it is processing: reschedule the same row instead."""
        self.emit_before("enqueue", proxy, delay_ms)
        proxy.pending_retry = (delay_ms, error_text(proxy), stored_options(proxy))
        try:
            self.send_pending_retry(proxy)
        except ConnectionClosed as exc:
            # Dramatiq's middleware hooks swallow errors, and the worker would then ack the failed run as a
            # success. The ack sends the retry instead, and Dramatiq repeats an ack until the queue answers.
            self.logger.warning(
                "Job %s could not be retried yet; its ack will retry it: %s", proxy.claim.job_id, exc
            )
        self.emit_after("enqueue", proxy, delay_ms)
        return proxy._message

    def send_pending_retry(self, proxy: JobProxy) -> None:
        """Reschedule a held job whose run failed; raises ConnectionClosed while the queue is unreachable."""
        if proxy.pending_retry is None:
            return
        delay_ms, error, options = proxy.pending_retry
        if not self.transport.retry(proxy.claim, delay_ms, error, options):
            self.logger.warning("Job %s could not be retried: its lease was lost.", proxy.claim.job_id)
        proxy.pending_retry = None
        proxy.settled = True
        self.forget(proxy)

    def _max_retries(self, message: Message[Any]) -> int:
        actor = self.actors.get(message.actor_name)
        if actor is not None and "max_retries" in actor.options:
            return int(actor.options["max_retries"])
        for middleware in self.middleware:
            if isinstance(middleware, Retries):
                return int(middleware.max_retries)
        return DEFAULT_MAX_RETRIES

    def _start_background(self) -> None:
        with self._lock:
            if self._leases is not None:
                return
            self._leases = LeaseKeeper(self.transport, self.lease_ms, self.held_jobs, self._lost)
            self._doorbell = self.transport.doorbell()
        self._leases.start()
        if self._doorbell is not None:
            self._doorbell.start(self._ring)

    def _ring(self, queue_name: str | None, run_at_ms: int) -> None:
        with self._lock:
            if queue_name is None:
                consumers = [c for cs in self._consumers.values() for c in cs]
            else:
                consumers = list(self._consumers.get(queue_name, ()))
        for consumer in consumers:
            consumer.ring(run_at_ms)

    def _stop_claiming(self) -> None:
        self.claiming = False
        running = [p for p in self.held_jobs() if not p.settled]
        self.logger.info(
            "Shutting down: stopped claiming; waiting for %d claimed job(s) to finish or go back.",
            len(running),
        )

    def _lost(self, proxy: JobProxy) -> None:
        proxy.settled = True
        self.forget(proxy)

    def _release_abandoned(self) -> None:
        """Jobs still running when the worker gave up waiting go back to pending, each named in a warning."""
        abandoned = [p for p in self.held_jobs() if not p.settled]
        for proxy in abandoned:
            self.logger.warning(
                "Job %s (%s) was still running at the shutdown deadline; releasing it back to the queue.",
                proxy.claim.job_id,
                proxy.actor_name,
            )
        if abandoned:
            try:
                self.transport.release([p.claim for p in abandoned])
            except Exception:
                self.logger.warning(
                    "Could not release %d job(s); their leases will return them.", len(abandoned)
                )
            for proxy in abandoned:
                proxy.settled = True  # their late acks, if the threads ever finish, change nothing
                self.forget(proxy)
