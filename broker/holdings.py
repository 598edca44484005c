"""The jobs a worker process holds, from claim to settled, and the threads that run them."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from dramatiq.threading import raise_thread_exception

from broker.interrupts import JobInterrupted
from broker.messages import JobProxy


class Holdings:
    """Thread-safe: consumer threads hold jobs, worker threads run and settle them, background threads look.

    A job stays held until its settlement commits (an ack stays held until its batch is completed), so its
    lease is extended until then; it stops counting against the claim capacity as soon as it finishes running.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._held: dict[str, JobProxy] = {}
        #: Jobs per queue that occupy capacity: claimed and not yet finished running.
        self._occupying: Counter[str] = Counter()
        #: job id -> the worker thread running it.
        self._running: dict[str, int] = {}
        self._freed: dict[str, list[Callable[[], None]]] = {}

    # -- claim to settle ----------------------------------------------------------------------------------
    def hold(self, proxy: JobProxy) -> None:
        with self._lock:
            self._held[proxy.claim.job_id] = proxy
            proxy.occupying = True
            self._occupying[proxy.queue_name] += 1

    def forget(self, proxy: JobProxy) -> None:
        """The job is settled (or lost): stop extending its lease and free its capacity."""
        with self._lock:
            if self._held.get(proxy.claim.job_id) is not proxy:
                return
            del self._held[proxy.claim.job_id]
            self._running.pop(proxy.claim.job_id, None)
            freed = self._release_capacity(proxy)
        if freed:
            self._notify(proxy.queue_name)

    def done_running(self, proxy: JobProxy) -> None:
        """The job's run ended (its settlement may still be in flight): free its capacity."""
        with self._lock:
            freed = self.holds(proxy) and self._release_capacity(proxy)
        if freed:
            self._notify(proxy.queue_name)

    def holds(self, proxy: JobProxy) -> bool:
        return self._held.get(proxy.claim.job_id) is proxy

    def find(self, job_id: str) -> JobProxy | None:
        """The held job with this id, if this worker holds it."""
        with self._lock:
            return self._held.get(job_id)

    def held(self) -> list[JobProxy]:
        with self._lock:
            return list(self._held.values())

    def occupying(self, queue_name: str | None = None) -> int:
        """Jobs claimed and not finished running: of one queue, or of every queue with None."""
        with self._lock:
            if queue_name is None:
                return sum(self._occupying.values())
            return self._occupying[queue_name]

    # -- running --------------------------------------------------------------------------------------
    def started(self, proxy: JobProxy) -> bool:
        """Called on the worker thread as the job starts; False when it must not run (no longer ours)."""
        with self._lock:
            if proxy.settled or proxy.interrupted is not None or proxy.handing_back or not self.holds(proxy):
                return False
            self._running[proxy.claim.job_id] = threading.get_ident()
            proxy.started_at = time.monotonic()
            return True

    def running_longer_than(self, seconds: float) -> int:
        """Jobs that have been running for more than `seconds`."""
        since = time.monotonic() - seconds
        with self._lock:
            started = (self._held[job_id].started_at for job_id in self._running if job_id in self._held)
            return sum(1 for at in started if at is not None and at < since)

    def waiting(self, queue_name: str) -> list[JobProxy]:
        """Jobs of the queue claimed and not started yet, oldest claim first."""
        with self._lock:
            found = [
                p
                for p in self._held.values()
                if p.queue_name == queue_name and p.started_at is None and p.occupying and not p.handing_back
            ]
        return sorted(found, key=lambda p: p.claimed_at)

    def take_back(self, proxies: list[JobProxy]) -> list[JobProxy]:
        """Mark those of `proxies` that still have not started as going back; no thread will start them."""
        taken = []
        with self._lock:
            for proxy in proxies:
                if proxy.started_at is None and not (proxy.settled or proxy.handing_back or proxy.finishing):
                    proxy.handing_back = True
                    taken.append(proxy)
        return taken

    def stopped(self, proxy: JobProxy) -> None:
        """Called on the worker thread as the job's run ends, before any hook that settles it."""
        with self._lock:
            self._running.pop(proxy.claim.job_id, None)

    def running(self) -> list[JobProxy]:
        with self._lock:
            return [self._held[job_id] for job_id in self._running if job_id in self._held]

    def is_running(self, proxy: JobProxy) -> bool:
        with self._lock:
            return proxy.claim.job_id in self._running

    def mark(self, proxy: JobProxy, exception: type[JobInterrupted]) -> bool:
        """Mark the job to be stopped for `exception`'s reason without raising it yet (should_stop() turns
        True); False when it is already being stopped for a reason of its own."""
        with self._lock:
            if proxy.interrupted is not None:
                return False
            proxy.interrupted = exception
            return True

    def interrupt(self, proxy: JobProxy, exception: type[JobInterrupted]) -> bool:
        """Mark the job interrupted and, if a thread runs it, raise `exception` there; True if it was running.

        Under the lock that `stopped` takes, so the exception never lands in a thread that has moved on.
        """
        with self._lock:
            if proxy.interrupted is None:
                proxy.interrupted = exception
            thread_id = self._running.get(proxy.claim.job_id)
            if thread_id is None:
                return False
            raise_thread_exception(thread_id, exception)
            return True

    # -- capacity listeners ---------------------------------------------------------------------------
    def on_freed(self, queue_name: str, callback: Callable[[], None]) -> None:
        with self._lock:
            self._freed.setdefault(queue_name, []).append(callback)

    def off_freed(self, queue_name: str, callback: Callable[[], None]) -> None:
        with self._lock:
            callbacks = self._freed.get(queue_name, [])
            if callback in callbacks:
                callbacks.remove(callback)

    def notify_all(self) -> None:
        """Wake every consumer (something other than a freed job changed what it may claim)."""
        with self._lock:
            callbacks = [c for cs in self._freed.values() for c in cs]
        for callback in callbacks:
            callback()

    def _release_capacity(self, proxy: JobProxy) -> bool:
        if proxy.occupying:
            proxy.occupying = False
            self._occupying[proxy.queue_name] -= 1
            return True
        return False

    def _notify(self, queue_name: str) -> None:
        with self._lock:
            # With a shared claim capacity any consumer may now claim; they are few.
            callbacks = [c for cs in self._freed.values() for c in cs]
        for callback in callbacks:
            callback()
