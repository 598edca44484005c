"""SupabaseBroker: Dramatiq's broker contract over the coding_jobs queue functions."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

import dramatiq
from dramatiq.errors import QueueJoinTimeout
from dramatiq.message import Message
from dramatiq.middleware import Middleware, SkipMessage, default_middleware
from dramatiq.middleware.retries import Retries

from broker.acks import AckBatcher
from broker.cancels import Cancellations
from broker.claim_ahead import SHORT_JOB_S, ShortJobs
from broker.consumer import JobConsumer
from broker.defaults import (
    DEFAULT_LEASE_MS,
    DEFAULT_MAX_RESCUES,
    DEFAULT_MAX_RETRIES,
    DEFAULT_POLL_INTERVAL_MS,
    DEFAULT_UNKNOWN_ACTOR_GRACE_MS,
)
from broker.errors import ConnectionClosed
from broker.holdings import Holdings
from broker.interrupts import JobCancelled, JobInterrupted, ShutdownDeadline, set_stop_check
from broker.keeper import Keeper
from broker.log_context import keep_arguments_out_of_logs
from broker.messages import JobProxy, error_text, job_id_for, stored_options
from broker.presence import PresenceState
from broker.retention import Pruner
from broker.sending import SendingBroker
from broker.settle import Settler
from broker.supervision import ThreadStatus
from broker.transport import Doorbell, Transport, WorkerInfo

#: Seconds close() gives interrupted jobs to unwind and hand themselves back.
INTERRUPT_WAIT_S = 2.0
#: Statuses that mean a queue still has work, for join().
ACTIVE_STATUSES = frozenset({"pending", "processing"})


def default_worker_id() -> str:
    """host:pid:random, so operators can tell which process holds a job."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class SupabaseBroker(SendingBroker):
    """A Dramatiq broker whose every state change is a call to the queue's SQL functions.

    Delays never reach the worker's in-memory delay queue: a delayed message is a row whose run_at is later,
    and a retry reschedules the same row. A worker registers itself, heartbeats, and rescues dead workers'
    jobs (broker/keeper.py); it stops running any job it can no longer be sure it holds.
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
        concurrency: int | None = None,
        shutdown_timeout_ms: int | None = None,
        max_rescues: int = DEFAULT_MAX_RESCUES,
        unknown_actor_grace_ms: int = DEFAULT_UNKNOWN_ACTOR_GRACE_MS,
        retain_completed_ms: int | None = None,
        retain_failed_ms: int | None = None,
    ) -> None:
        if middleware is None:
            middleware = [m() for m in default_middleware if m is not Retries]
            middleware.insert(0, Retries(max_retries=max_retries))
        super().__init__(transport, middleware=middleware)
        self.queues: set[str] = set()
        self.worker_id = worker_id or default_worker_id()
        self.lease_ms = lease_ms
        #: Jobs a worker process may hold beyond its threads, across all its queues; None keeps Dramatiq's
        #: per-queue prefetch (twice the threads), which suits short jobs best.
        self.claim_ahead = claim_ahead
        #: Jobs a worker process runs at once at most, whatever --threads says (with claim_ahead set).
        self.concurrency = concurrency
        #: Milliseconds after the start of a graceful shutdown at which running jobs are stopped and handed
        #: back, whatever --worker-shutdown-timeout says; None leaves it to Dramatiq.
        self.shutdown_timeout_ms = shutdown_timeout_ms
        self.max_rescues = max_rescues
        self.unknown_actor_grace_ms = unknown_actor_grace_ms
        #: Milliseconds finished jobs are kept (completed and cancelled; failed) before this worker's pruner
        #: deletes them; None keeps them. With both None the worker does not prune.
        self.retain_completed_ms = retain_completed_ms
        self.retain_failed_ms = retain_failed_ms
        self.poll_interval_s = poll_interval_ms / 1000
        #: time.time() of the last consumer iteration: the health check's sign of life.
        self.last_tick = time.time()
        self._lock = threading.RLock()
        self.holdings = Holdings()
        self.short_jobs = ShortJobs()
        self.acks = AckBatcher(transport, self._completed)
        self.settler = Settler(transport, self.holdings, self.acks)
        self.cancellations = Cancellations(self.holdings)
        self.presence = PresenceState(transport.presence_policy())
        self._consumers: dict[str, list[JobConsumer]] = {}
        self._consumed: set[str] = set()
        self._worker_threads: int | None = None
        self._doorbell: Doorbell | None = None
        self._keeper: Keeper | None = None
        self._pruner: Pruner | None = None
        #: Cleared at worker shutdown: consumers stop claiming while running jobs finish.
        self.claiming = True

    # -- Dramatiq's contract ----------------------------------------------------------------------------
    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> JobConsumer:
        with self._lock:
            self._consumed.add(queue_name)
        self._start_background()
        consumer = JobConsumer(self, queue_name, self.prefetch_for(prefetch), timeout)
        with self._lock:
            self._consumers.setdefault(queue_name, []).append(consumer)
        return consumer

    def prefetch_for(self, prefetch: int) -> int:
        """How many jobs one consumer may hold: Dramatiq's prefetch, or the threads plus claim_ahead."""
        threads = self._running_threads()
        if self.claim_ahead is None or threads is None:
            return prefetch
        return max(1, threads + self.claim_ahead)

    def declare_queue(self, queue_name: str) -> None:
        if queue_name not in self.queues:
            self.emit_before("declare_queue", queue_name)
            self.queues.add(queue_name)
            self.emit_after("declare_queue", queue_name)

    def held_retry(self, message: Message[Any], delay: int | None) -> Message[Any] | None:
        if isinstance(message, JobProxy) and self.holdings.holds(message):
            return self._retry(message, delay or 0)  # a held job's retry reschedules its own row
        return None

    def declare_actor(self, actor: dramatiq.Actor[Any, Any]) -> None:
        # A job the broker stopped is not retried by Dramatiq's Retries (its actor `throws` JobInterrupted):
        # the broker settles it (lost: left alone; shutdown: handed back). The option lives in memory only.
        throws = actor.options.get("throws")
        throws = throws if isinstance(throws, tuple) else (throws,) if throws else ()
        if JobInterrupted not in throws:
            actor.options["throws"] = (*throws, JobInterrupted)
        keep_arguments_out_of_logs(actor)
        super().declare_actor(actor)

    def get_declared_queues(self) -> set[str]:
        return self.queues.copy()

    def flush(self, queue_name: str) -> None:
        self.transport.purge(queue_name)

    def flush_all(self) -> None:
        for queue_name in self.queues:
            self.flush(queue_name)

    def cancel(self, message: Message[Any] | str, reason: str | None = None) -> str:
        """Cancel a job by its message (or message id): a pending job never runs, a running one is stopped
        by its worker within about a second and ends `cancelled`. Returns what happened: 'cancelled',
        'cancelling', the status of a job that had already finished, or 'not_found'."""
        [outcome] = self.transport.cancel([job_id_for(message)], reason)
        return outcome.outcome

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
        elif signal == "process_message":
            self._starting(args[0])
        super().emit_before(signal, *args, **kwargs)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        if signal in ("process_message", "skip_message"):
            self._finished(args[0])
        super().emit_after(signal, *args, **kwargs)

    def close(self) -> None:
        """Complete acked jobs, hand back those still held, stop threads, leave the registry, disconnect."""
        self._hand_back_at_close()
        if self._pruner is not None:
            self._pruner.stop()
        if self._keeper is not None:
            self._keeper.stop()
        if self._doorbell is not None or self._keeper is not None:
            try:
                self.transport.deregister_worker(self.worker_id)
            except Exception as exc:
                self.logger.warning(
                    "Could not leave the worker registry (%s); the rescue will clear it.", exc
                )
        if self._doorbell is not None:
            self._doorbell.stop()
        self.transport.close()
        self._closed()

    def _closed(self) -> None:
        """Tell the middleware that has an `after_broker_close` hook (Dramatiq has no such signal)."""
        for middleware in self.middleware:
            hook = getattr(middleware, "after_broker_close", None)
            if hook is not None:
                try:
                    hook(self)
                except Exception:
                    self.logger.exception("after_broker_close of %r failed", middleware)

    # -- what the consumers and the health check ask ------------------------------------------------------
    def may_claim(self) -> bool:
        return self.claiming and self.presence.may_claim()

    def capacity(self, queue_name: str, prefetch: int) -> int:
        """Room to claim for one consumer: per queue with Dramatiq's prefetch; shared with claim_ahead, plus
        what short jobs allow (broker/claim_ahead.py)."""
        if self.claim_ahead is None:
            return prefetch - self.holdings.occupying(queue_name)
        threads = self._running_threads() or 0
        short = self.short_jobs.room(threads, self.holdings.running_longer_than(SHORT_JOB_S))
        return prefetch + short - self.holdings.occupying()

    def may_wait(self) -> int | None:
        """Claimed jobs that may wait for a thread: any with Dramatiq's prefetch, else claim_ahead; the rest
        go back to the queue when no thread freed up for them in time (broker/claim_ahead.py)."""
        return self.claim_ahead

    def knows_actor(self, actor_name: str) -> bool:
        return actor_name in self.actors

    def claimed(self, proxies: list[JobProxy], sent_at: float) -> None:
        if self._keeper is not None:
            self._keeper.trust_lease(proxies, sent_at)

    def background_threads(self) -> list[ThreadStatus]:
        """The supervised background threads of this process, for the heartbeat file and /health."""
        statuses = [] if self._keeper is None else self._keeper.statuses()
        if self._pruner is not None:
            statuses.append(self._pruner.status())
        acks = self.acks.status()
        if acks is not None:
            statuses.append(acks)
        status = getattr(self._doorbell, "status", None)
        if callable(status):
            found = status()
            if isinstance(found, ThreadStatus):
                statuses.append(found)
        return statuses

    def worker_info(self) -> WorkerInfo:
        with self._lock:
            queues = tuple(sorted(self._consumed or self.queues))
        return WorkerInfo(
            worker_id=self.worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            queues=queues,
            concurrency=self._running_threads(),
        )

    # -- settling -------------------------------------------------------------------------------------
    def send_pending_retry(self, proxy: JobProxy) -> None:
        """Reschedule a held job whose run failed; raises ConnectionClosed while the queue is unreachable."""
        if proxy.pending_retry is None:
            return
        delay_ms, error, options = proxy.pending_retry
        self.settler.retry(proxy, delay_ms, error, options)

    def settle_interrupted(self, proxy: JobProxy) -> None:
        """A job the broker stopped: lost ones are left alone, shutdown ones go back to the queue, cancelled
        ones end cancelled."""
        if proxy.interrupted is JobCancelled and self.holdings.holds(proxy):
            self.settler.cancel(proxy)
            self.logger.info("Job %s was cancelled.", proxy.claim.job_id)
        elif proxy.interrupted is ShutdownDeadline and self.holdings.holds(proxy):
            self.settler.release([proxy])
            self.logger.info(
                "Job %s was handed back to the queue at the shutdown deadline.", proxy.claim.job_id
            )
        else:
            self.settler.let_go(proxy)

    def _completed(self, proxy: JobProxy) -> None:
        self.settler.let_go(proxy)

    def _retry(self, proxy: JobProxy, delay_ms: int) -> Message[Any]:
        """Dramatiq's Retries re-enqueues the message it is processing: reschedule the same row instead."""
        if proxy.interrupted is not None:
            return proxy._message  # the broker stopped it; its ack settles it (settle_interrupted)
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

    # -- running jobs ---------------------------------------------------------------------------------
    def _starting(self, message: Any) -> None:
        if not isinstance(message, JobProxy):
            return
        if not self.holdings.started(message):
            message.skipped = True
            raise SkipMessage(f"job {message.claim.job_id} is no longer held by this worker")
        set_stop_check(lambda: self._must_stop(message))

    def _must_stop(self, proxy: JobProxy) -> bool:
        """should_stop() for a running job: stopped by the broker, or no longer surely held by this worker."""
        return (
            proxy.interrupted is not None
            or proxy.settled
            or time.monotonic() > proxy.lease_valid_until
            or not self.presence.may_run()
        )

    def _finished(self, message: Any) -> None:
        set_stop_check(None)
        if isinstance(message, JobProxy):
            if message.started_at is not None:
                self.short_jobs.ran(time.monotonic() - message.started_at)
            self.holdings.stopped(message)
            self.holdings.done_running(message)

    # -- internals ------------------------------------------------------------------------------------
    def _running_threads(self) -> int | None:
        if self._worker_threads is None:
            return None
        if self.concurrency is None:
            return self._worker_threads
        return min(self._worker_threads, self.concurrency)

    def _start_background(self) -> None:
        with self._lock:
            if self._keeper is not None:
                return
            self._doorbell = self.transport.doorbell(self.worker_info(), self.presence)
            # The doorbell found out whether this connection can hold a session (LISTEN and a lock): presence
            # follows it (issue 12); before, the policy was the transport's guess, made without a connection.
            self.presence.policy = self.transport.presence_policy()
            keeper = Keeper(
                self.transport,
                worker=self.worker_info,
                holdings=self.holdings,
                settler=self.settler,
                presence=self.presence,
                lease_ms=self.lease_ms,
                max_rescues=self.max_rescues,
                doorbell=lambda: self._doorbell,
                cancellations=self.cancellations,
            )
            # Published only once started: a heartbeat file written in between would call a thread that has
            # not started yet dead, and /health would fail for it.
            keeper.start()
            self._keeper = keeper
            if self.retain_completed_ms is not None or self.retain_failed_ms is not None:
                pruner = Pruner(
                    self.transport, completed_ms=self.retain_completed_ms, failed_ms=self.retain_failed_ms
                )
                pruner.start()
                self._pruner = pruner
        if self._doorbell is not None:
            self._doorbell.start(self._ring, self._cancel_requested)

    def _cancel_requested(self, job_id: str) -> None:
        self.cancellations.request(job_id)

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
        running = [p for p in self.holdings.held() if not p.settled]
        self.logger.info(
            "Shutting down: stopped claiming; waiting for %d claimed job(s) to finish or go back.",
            len(running),
        )
        if self._keeper is not None:
            self._keeper.start_shutdown(self.shutdown_timeout_ms)

    def _unwinding(self) -> bool:
        """Jobs still running, or stopped by the broker and not yet handed back by their thread."""
        return any(
            self.holdings.is_running(p) or (p.interrupted is not None and not p.settled)
            for p in self.holdings.held()
        )

    def _hand_back_at_close(self) -> None:
        """At close: stop jobs still running, give them INTERRUPT_WAIT_S to hand themselves back, flush the
        acks, release what never ran; a job whose thread will not stop is left for the rescue, which takes it
        only once this process (and with it the thread) is gone."""
        self.claiming = False
        if self._keeper is not None and self.holdings.running():
            self._keeper.interrupt_running_for_shutdown()
            deadline = time.monotonic() + INTERRUPT_WAIT_S
            while self._unwinding() and time.monotonic() < deadline:
                time.sleep(0.02)
        self.acks.close()
        stuck = set(map(id, self.holdings.running()))
        idle = [p for p in self.holdings.held() if id(p) not in stuck and not p.settled and not p.finishing]
        if idle:
            try:
                released = self.settler.release(idle)
                self.logger.info("Released %d claimed job(s) back to pending at shutdown.", released)
            except ConnectionClosed:
                self.logger.warning(
                    "Could not release %d job(s) at shutdown; the rescue will return them.", len(idle)
                )
        for proxy in self.holdings.running():
            self.logger.warning(
                "Job %s (%s) did not stop by the shutdown deadline; it goes back to the queue once this "
                "process has exited.",
                proxy.claim.job_id,
                proxy.actor_name,
            )
