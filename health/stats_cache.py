"""One cached read of the queue's statistics, shared by /metrics and the queue monitor: get_queue_stats(),
get_actor_stats(), get_queue_consumers() and get_paused_queues(), each flat in the history's size."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from broker.operator_records import ActorStat, PausedQueue, PlanStat
from broker.transport import QueueStat, Transport
from health.background_call import BackgroundCall
from service.settings import DEFAULT_READINESS_TIMEOUT_MS


@dataclasses.dataclass(frozen=True, slots=True)
class StatsReading:
    """The result of one read: the rows, or why there are none."""

    stats: tuple[QueueStat, ...]
    #: Epoch seconds at which the read finished.
    read_at: float
    #: The error's type and message when the read failed (no credentials: driver messages carry none).
    error: str | None = None
    #: Registered workers per queue they consume.
    consumers: tuple[tuple[str, int], ...] = ()
    #: Jobs by queue, actor and status.
    actors: tuple[ActorStat, ...] = ()
    #: Queues no worker claims from until they are resumed.
    paused: tuple[PausedQueue, ...] = ()
    #: Per plan: caps, running jobs and jobs waiting for their user's cap (fair share).
    plans: tuple[PlanStat, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


class StatsCache:
    """Reads get_queue_stats() at most once per `max_age_ms`, however many probes ask.

    A failed read is cached too, so an unreachable database is not hammered by every scrape. Callers that
    arrive during a read share it, and wait for it at most `wait_ms`: a hung database makes /metrics say
    so on time instead of tying up the server's threads.
    """

    def __init__(
        self,
        transport: Transport,
        max_age_ms: int,
        *,
        wait_ms: int = DEFAULT_READINESS_TIMEOUT_MS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.max_age_s = max_age_ms / 1000
        self.wait_s = wait_ms / 1000
        self._clock = clock
        self._lock = threading.Lock()
        self._reading: StatsReading | None = None
        self._fetched_at = 0.0
        self._fetch: BackgroundCall[StatsReading] | None = None

    def read(self) -> StatsReading:
        with self._lock:
            if self._reading is not None and self._clock() - self._fetched_at < self.max_age_s:
                return self._reading
            if self._fetch is None:
                self._fetch = BackgroundCall(self._read_and_keep, "queue-stats-read")
            fetch = self._fetch
        if fetch.wait(self.wait_s) and fetch.result is not None:
            return fetch.result
        return StatsReading(
            stats=(),
            read_at=time.time(),
            error=f"get_queue_stats() did not answer within {self.wait_s * 1000:.0f} ms",
        )

    def _read_and_keep(self) -> StatsReading:
        reading = self._read()
        with self._lock:
            self._reading = reading
            self._fetched_at = self._clock()
            self._fetch = None
        return reading

    def _read(self) -> StatsReading:
        try:
            stats = tuple(self.transport.stats())
            consumers = tuple(sorted(self.transport.consumers().items()))
            actors = tuple(self.transport.actor_stats())
            paused = tuple(self.transport.paused_queues())
            plans = tuple(self.transport.fairness())
        except Exception as exc:
            # Any failure, not only ConnectionClosed: a probe must answer, and the monitor must keep going.
            return StatsReading(stats=(), read_at=time.time(), error=f"{type(exc).__name__}: {exc}")
        return StatsReading(
            stats=stats,
            read_at=time.time(),
            consumers=consumers,
            actors=actors,
            paused=paused,
            plans=plans,
        )
