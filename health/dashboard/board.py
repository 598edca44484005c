"""What the dashboard shows, read in one go through the transport's operator calls."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from broker.operator_records import (
    HISTORY_MINUTES,
    FairnessSettings,
    JobFilter,
    JobSummary,
    PausedQueue,
    PlanShare,
    QueueMinute,
    WorkerRecord,
)
from broker.transport import QueueStat, Transport

#: Jobs listed per section of the main page.
LISTED_JOBS = 25
#: Statuses the depth chart draws, and those the throughput chart stacks.
DEPTH_STATUSES = ("pending", "processing")
FINISH_STATUSES = ("completed", "failed", "cancelled")


@dataclasses.dataclass(frozen=True, slots=True)
class QueueRow:
    """One queue on the main page."""

    name: str
    counts: dict[str, int]
    #: Seconds the longest-waiting due job has waited; None when none is due.
    oldest_wait_s: float | None
    consumers: int
    paused: PausedQueue | None

    @property
    def unconsumed(self) -> bool:
        return bool(self.counts.get("pending")) and self.consumers == 0


@dataclasses.dataclass(frozen=True, slots=True)
class Chart:
    """Per-minute series of the last hour, summed over the queues: minute starts, and a series per status."""

    minutes: tuple[datetime, ...]
    series: dict[str, tuple[float | None, ...]]


@dataclasses.dataclass(frozen=True, slots=True)
class Board:
    """Everything the main page shows, read at `now`."""

    now: datetime
    queues: tuple[QueueRow, ...]
    running: tuple[JobSummary, ...]
    pending: tuple[JobSummary, ...]
    failed: tuple[JobSummary, ...]
    cancelled: tuple[JobSummary, ...]
    workers: tuple[WorkerRecord, ...]
    #: Fair share: each plan's tier, cap and users at it, and the switch with its aging step.
    plans: tuple[PlanShare, ...]
    fairness: FairnessSettings
    depth: Chart
    throughput: Chart


def read_board(transport: Transport) -> Board:
    """Read the main page's data: a handful of calls, each flat in the size of the history."""
    stats = transport.stats()
    consumers = transport.consumers()
    paused = {p.queue_name: p for p in transport.paused_queues()}
    history = transport.queue_history(HISTORY_MINUTES)
    now = datetime.now(UTC)
    return Board(
        now=now,
        queues=_queues(stats, consumers, paused, now),
        running=tuple(transport.list_jobs(JobFilter(status="processing"), limit=LISTED_JOBS)),
        pending=tuple(transport.list_jobs(JobFilter(status="pending"), limit=LISTED_JOBS)),
        failed=tuple(transport.list_jobs(JobFilter(status="failed"), limit=LISTED_JOBS)),
        cancelled=tuple(transport.list_jobs(JobFilter(status="cancelled"), limit=LISTED_JOBS // 2)),
        workers=tuple(transport.workers()),
        plans=tuple(transport.plans()),
        fairness=transport.fairness_settings(),
        depth=_chart(history, now, DEPTH_STATUSES, depth=True),
        throughput=_chart(history, now, FINISH_STATUSES, depth=False),
    )


def _queues(
    stats: list[QueueStat], consumers: dict[str, int], paused: dict[str, PausedQueue], now: datetime
) -> tuple[QueueRow, ...]:
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    waits: dict[str, float] = {}
    for stat in stats:
        counts[stat.queue_name][stat.status] = stat.jobs
        if stat.status == "pending" and stat.oldest_due_at is not None:
            waits[stat.queue_name] = max((now - stat.oldest_due_at).total_seconds(), 0.0)
    names = sorted(set(counts) | set(paused) | set(consumers))
    return tuple(
        QueueRow(name, counts.get(name, {}), waits.get(name), consumers.get(name, 0), paused.get(name))
        for name in names
    )


def _chart(history: list[QueueMinute], now: datetime, statuses: tuple[str, ...], *, depth: bool) -> Chart:
    end = now.replace(second=0, microsecond=0)
    minutes = tuple(end - timedelta(minutes=HISTORY_MINUTES - 1 - i) for i in range(HISTORY_MINUTES))
    index = {minute: i for i, minute in enumerate(minutes)}
    values: dict[str, list[float | None]] = {status: [None] * len(minutes) for status in statuses}
    for row in history:
        i = index.get(row.minute.astimezone(UTC))
        if i is None or row.status not in values:
            continue
        value: float | None = row.depth if depth else row.entered
        if value is not None:
            values[row.status][i] = (values[row.status][i] or 0) + value
    for status, series in values.items():
        if depth:
            # A minute with no change has no snapshot: the depth stayed what it was.
            last: float | None = None
            for i, value in enumerate(series):
                last = value if value is not None else last
                series[i] = last
        else:
            values[status] = [value or 0 for value in series]
    return Chart(minutes, {status: tuple(series) for status, series in values.items()})


def age_s(moment: datetime | None, now: datetime) -> float | None:
    """Seconds from `moment` to `now` (never negative), or None."""
    return None if moment is None else max((now - moment).total_seconds(), 0.0)
