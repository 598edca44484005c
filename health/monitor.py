"""The queue monitor: one structured log line of queue statistics every QUEUE_STATS_INTERVAL_MS.

It runs in the health server's process, which is one per container, and reads through the same cache as
/metrics, so logging adds no queries of its own when a scrape has just read the stats.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import defaultdict
from datetime import datetime
from typing import Any

from loguru import logger

from broker.operator_records import JOB_STATUSES
from health.stats_cache import StatsCache, StatsReading

#: The statuses of public.job_status, in the order a line shows them.
STATUSES = JOB_STATUSES


@dataclasses.dataclass(frozen=True, slots=True)
class QueueSummary:
    """What one monitor line says."""

    #: queue name -> status -> jobs.
    queues: dict[str, dict[str, int]]
    #: status -> jobs over every queue.
    totals: dict[str, int]
    #: Seconds the longest-waiting pending job has waited since it was due (jobs delayed into the future wait
    #: on purpose and do not count); None when no pending job is due.
    oldest_pending_age_s: float | None
    #: Jobs completed per minute since the previous line; None on the first line.
    jobs_per_minute: float | None
    #: Queues with pending jobs that no registered worker consumes: nobody will ever run them.
    unconsumed: tuple[str, ...] = ()
    #: Queues paused by an operator (their jobs wait until resumed).
    paused: tuple[str, ...] = ()
    #: queue name -> actor name -> status -> jobs (statuses with none left out).
    actors: dict[str, dict[str, dict[str, int]]] = dataclasses.field(default_factory=dict)
    #: Due jobs waiting because their user runs as many jobs as their plan allows.
    capped_waiting: int = 0
    #: plan -> seconds since its tier's oldest due pending job was created (plans with one waiting).
    oldest_pending_by_plan_s: dict[str, float] = dataclasses.field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The log line's fields: flat numbers to filter on, the per-queue and per-actor counts as JSON."""
        return {
            **self.totals,
            "queues": _compact(self.queues),
            "actors": _compact(self.actors) if self.actors else None,
            "oldest_pending_age_s": self.oldest_pending_age_s,
            "jobs_per_minute": self.jobs_per_minute,
            "unconsumed_queues": ",".join(self.unconsumed) or None,
            "paused_queues": ",".join(self.paused) or None,
            "capped_waiting": self.capped_waiting,
            "oldest_pending_by_plan_s": json.dumps(self.oldest_pending_by_plan_s, sort_keys=True),
        }


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def summarize(reading: StatsReading, previous: StatsReading | None) -> QueueSummary:
    queues: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(STATUSES, 0))
    totals = dict.fromkeys(STATUSES, 0)
    oldest_pending: datetime | None = None
    for stat in reading.stats:
        queues[stat.queue_name][stat.status] = stat.jobs
        totals[stat.status] = totals.get(stat.status, 0) + stat.jobs
        if stat.status == "pending" and stat.oldest_due_at is not None:
            oldest_pending = min(oldest_pending or stat.oldest_due_at, stat.oldest_due_at)
    oldest_age_s = None
    if oldest_pending is not None:
        oldest_age_s = round(max(reading.read_at - oldest_pending.timestamp(), 0.0), 3)
    consumed = {queue for queue, workers in reading.consumers if workers > 0}
    unconsumed = tuple(
        sorted(q for q, counts in queues.items() if counts.get("pending") and q not in consumed)
    )
    actors: dict[str, dict[str, dict[str, int]]] = {}
    for actor in reading.actors:
        if actor.jobs:
            by_status = actors.setdefault(actor.queue_name, {}).setdefault(actor.actor_name, {})
            by_status[actor.status] = actor.jobs
    return QueueSummary(
        queues=dict(queues),
        totals=totals,
        oldest_pending_age_s=oldest_age_s,
        jobs_per_minute=_jobs_per_minute(reading, previous),
        unconsumed=unconsumed,
        paused=tuple(sorted(p.queue_name for p in reading.paused)),
        actors=actors,
        capped_waiting=sum(plan.capped_pending_jobs for plan in reading.plans),
        oldest_pending_by_plan_s={
            plan.plan: round(max(reading.read_at - plan.oldest_pending_at.timestamp(), 0.0), 3)
            for plan in reading.plans
            if plan.oldest_pending_at is not None
        },
    )


def _completed(reading: StatsReading) -> int:
    """Jobs completed so far: the counter of completions when the reading has it (retention deleting old rows
    does not lower it), else the completed rows."""
    if reading.actors:
        return sum(actor.entered for actor in reading.actors if actor.status == "completed")
    return sum(stat.jobs for stat in reading.stats if stat.status == "completed")


def _jobs_per_minute(reading: StatsReading, previous: StatsReading | None) -> float | None:
    if previous is None or not previous.ok:
        return None
    elapsed_min = (reading.read_at - previous.read_at) / 60
    delta = _completed(reading) - _completed(previous)
    # A cached read seen twice has no elapsed time; a shrinking count means rows were deleted.
    if elapsed_min <= 0 or delta < 0:
        return None
    return round(delta / elapsed_min, 2)


class QueueMonitor:
    """Logs a QueueSummary from a daemon thread every `interval_ms`."""

    def __init__(self, cache: StatsCache, interval_ms: int) -> None:
        self.cache = cache
        self.interval_s = interval_ms / 1000
        self._previous: StatsReading | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def log_once(self) -> QueueSummary | None:
        """Read the (cached) stats and log one line; returns what it logged, None when the read failed."""
        reading = self.cache.read()
        log = logger.bind(event="queue_stats")
        if not reading.ok:
            log.bind(error=reading.error).warning("Queue statistics unavailable: {}", reading.error)
            return None
        summary = summarize(reading, self._previous)
        if self._previous is None or reading.read_at != self._previous.read_at:
            self._previous = reading
        rate = "n/a" if summary.jobs_per_minute is None else f"{summary.jobs_per_minute:g}"
        oldest = "none" if summary.oldest_pending_age_s is None else f"{summary.oldest_pending_age_s:.1f} s"
        counts = ", ".join(f"{summary.totals.get(status, 0)} {status}" for status in STATUSES)
        paused = f"; paused: {', '.join(summary.paused)}" if summary.paused else ""
        capped = f"; {summary.capped_waiting} waiting for their plan's cap" if summary.capped_waiting else ""
        log.bind(**summary.fields()).info(
            "Queue: {}; oldest pending {}; {} jobs/min{}{}", counts, oldest, rate, paused, capped
        )
        for queue in summary.unconsumed:
            pending = summary.queues[queue].get("pending", 0)
            logger.bind(event="queue_unconsumed", queue=queue, pending=pending).warning(
                "Queue {!r} has {} pending job(s) and no worker consumes it: check the producers' queue name "
                "and the workers' --queues",
                queue,
                pending,
            )
        return summary

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="queue-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.log_once()
            except Exception:
                logger.exception("The queue monitor failed to log; it keeps going")
