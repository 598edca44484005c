"""One worker process's job counts: in progress, processed, failed, retried, and how long jobs took."""

from __future__ import annotations

import bisect
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

#: Upper bounds of the job-duration histogram, in seconds; a last +Inf bucket is implied.
DURATION_BOUNDS_S: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclasses.dataclass(slots=True)
class ActorJobStats:
    """Counts for one actor on one queue since this worker process started."""

    queue_name: str
    actor_name: str
    #: Jobs that ran to the end, with or without an error.
    processed: int = 0
    #: Jobs dead-lettered: they end `failed` in the queue.
    failed: int = 0
    #: Jobs that raised and were rescheduled for another attempt.
    retried: int = 0
    duration_sum_s: float = 0.0
    #: Observations per bucket of DURATION_BOUNDS_S plus +Inf (not cumulative).
    duration_counts: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(DURATION_BOUNDS_S) + 1))

    def observe(self, duration_s: float) -> None:
        self.duration_sum_s += duration_s
        self.duration_counts[bisect.bisect_left(DURATION_BOUNDS_S, duration_s)] += 1

    def copy(self) -> ActorJobStats:
        return dataclasses.replace(self, duration_counts=list(self.duration_counts))

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ActorJobStats:
        return cls(
            queue_name=str(data["queue_name"]),
            actor_name=str(data["actor_name"]),
            processed=int(data["processed"]),
            failed=int(data["failed"]),
            retried=int(data["retried"]),
            duration_sum_s=float(data["duration_sum_s"]),
            duration_counts=[int(count) for count in data["duration_counts"]],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class JobSnapshot:
    in_progress: int
    processed: int
    jobs: tuple[ActorJobStats, ...]


class JobCounters:
    """Thread-safe counts fed from Dramatiq's hooks on worker threads.

    In-progress jobs are a set of message ids rather than a counter, so a hook that fires without its
    partner (a message skipped before our `before_process_message` ran) cannot drive the count negative.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}
        #: Messages that raised and are not yet acked or nacked: a re-enqueue of one of them is a retry.
        self._errored: set[str] = set()
        self._by_actor: dict[tuple[str, str], ActorJobStats] = {}

    def _stats(self, queue_name: str, actor_name: str) -> ActorJobStats:
        key = (queue_name, actor_name)
        stats = self._by_actor.get(key)
        if stats is None:
            stats = self._by_actor[key] = ActorJobStats(queue_name, actor_name)
        return stats

    def started(self, message_id: str) -> None:
        with self._lock:
            self._started[message_id] = self._clock()

    def finished(self, message_id: str, queue_name: str, actor_name: str, *, errored: bool) -> None:
        with self._lock:
            started = self._started.pop(message_id, None)
            stats = self._stats(queue_name, actor_name)
            stats.processed += 1
            if started is not None:
                stats.observe(max(self._clock() - started, 0.0))
            if errored:
                self._errored.add(message_id)

    def skipped(self, message_id: str) -> None:
        with self._lock:
            self._started.pop(message_id, None)

    def reenqueued(self, message_id: str, queue_name: str, actor_name: str) -> None:
        with self._lock:
            if message_id in self._errored:
                self._errored.discard(message_id)
                self._stats(queue_name, actor_name).retried += 1

    def settled(self, message_id: str, queue_name: str, actor_name: str, *, failed: bool) -> None:
        with self._lock:
            self._errored.discard(message_id)
            if failed:
                self._stats(queue_name, actor_name).failed += 1

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            jobs = tuple(stats.copy() for stats in self._by_actor.values())
            return JobSnapshot(
                in_progress=len(self._started),
                processed=sum(stats.processed for stats in jobs),
                jobs=jobs,
            )
