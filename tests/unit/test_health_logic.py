"""Pure logic of the health package: job counters, the monitor's summary, heartbeat files round-trip."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.operator_records import ActorStat
from broker.transport import QueueStat
from health.job_counters import DURATION_BOUNDS_S, ActorJobStats, JobCounters
from health.liveness import assess
from health.monitor import summarize
from health.run_folder import WorkerBeat, process_start, read_beats, write_beat
from health.stats_cache import StatsReading


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_counters_count_processed_retried_failed_and_durations() -> None:
    clock = FakeClock()
    counters = JobCounters(clock)

    # A job that succeeds after 2 s
    counters.started("a")
    assert counters.snapshot().in_progress == 1
    clock.now += 2.0
    counters.finished("a", "default", "work", errored=False)
    counters.settled("a", "default", "work", failed=False)
    # A job that raises, is retried, raises again and is dead-lettered
    for attempt in range(2):
        counters.started("b")
        counters.finished("b", "default", "work", errored=True)
        if attempt == 0:
            counters.reenqueued("b", "default", "work")
            counters.settled("b", "default", "work", failed=False)
        else:
            counters.settled("b", "default", "work", failed=True)
    # A new message enqueued by a job is not a retry
    counters.reenqueued("c", "default", "work")

    snapshot = counters.snapshot()
    [stats] = snapshot.jobs
    assert (snapshot.in_progress, snapshot.processed) == (0, 3)
    assert (stats.processed, stats.retried, stats.failed) == (3, 1, 1)
    assert stats.duration_sum_s == 2.0
    assert stats.duration_counts[DURATION_BOUNDS_S.index(2.5)] == 1
    assert stats.duration_counts[0] == 2


def test_a_skip_without_a_start_does_not_go_negative() -> None:
    counters = JobCounters()
    counters.skipped("never-started")
    assert counters.snapshot().in_progress == 0


def test_a_duration_on_a_bound_falls_in_that_bucket() -> None:
    stats = ActorJobStats("q", "a")
    stats.observe(1.0)
    stats.observe(3601.0)
    assert stats.duration_counts[DURATION_BOUNDS_S.index(1)] == 1
    assert stats.duration_counts[-1] == 1


def _reading(read_at: float, **jobs: int) -> StatsReading:
    created = datetime.fromtimestamp(read_at, UTC) - timedelta(seconds=90)
    due = created + timedelta(seconds=30)
    return StatsReading(
        stats=tuple(
            QueueStat("default", status, count, created, None, due if status == "pending" else None)
            for status, count in jobs.items()
        ),
        read_at=read_at,
    )


def test_the_summary_has_counts_the_oldest_pending_wait_and_a_rate() -> None:
    first = summarize(_reading(1000.0, pending=5, completed=10), None)
    second = summarize(_reading(1030.0, pending=2, completed=16), _reading(1000.0, pending=5, completed=10))

    assert first.jobs_per_minute is None
    assert first.totals == {"pending": 5, "processing": 0, "completed": 10, "failed": 0, "cancelled": 0}
    # Waiting since it fell due (60 s ago), not since it was created (90 s ago)
    assert first.oldest_pending_age_s == 60.0
    assert second.jobs_per_minute == 12.0
    assert second.queues == {
        "default": {"pending": 2, "processing": 0, "completed": 16, "failed": 0, "cancelled": 0}
    }


def test_jobs_delayed_into_the_future_do_not_count_as_waiting() -> None:
    # Given a queue whose only pending jobs are delayed (none is due), created long ago
    created = datetime.fromtimestamp(1000.0, UTC) - timedelta(hours=2)
    reading = StatsReading(
        stats=(QueueStat("later", "pending", 3, created, created + timedelta(hours=5), None),),
        read_at=1000.0,
    )

    # Then nothing waits: an alert on the oldest pending age must not fire for them
    assert summarize(reading, None).oldest_pending_age_s is None


def test_the_rate_comes_from_the_completion_counter_when_retention_deletes_rows() -> None:
    # Given two readings between which 6 jobs completed and the retention deleted 10 old completed rows
    def reading(read_at: float, rows: int, ever: int) -> StatsReading:
        return StatsReading(
            stats=(QueueStat("default", "completed", rows, None, None),),
            read_at=read_at,
            actors=(ActorStat("default", "work", "completed", rows, ever),),
        )

    summary = summarize(reading(1030.0, 6, 16), reading(1000.0, 10, 10))

    # Then the rate counts the completions, not the rows left
    assert summary.jobs_per_minute == 12.0
    assert summary.actors == {"default": {"work": {"completed": 6}}}


def test_no_rate_from_the_same_cached_read_or_a_shrinking_count() -> None:
    same = _reading(1000.0, completed=3)
    assert summarize(same, same).jobs_per_minute is None
    assert summarize(_reading(1060.0, completed=1), _reading(1000.0, completed=3)).jobs_per_minute is None


def test_a_heartbeat_file_round_trips_and_temporary_files_are_ignored(tmp_path: Path) -> None:
    stats = ActorJobStats("default", "work", processed=2, failed=1, retried=1)
    stats.observe(0.3)
    written = WorkerBeat(
        pid=os.getpid(),
        worker_id="host:1:abc",
        process_start=process_start(os.getpid()),
        started_at=1.0,
        heartbeat_at=2.0,
        written_at=3.0,
        state="running",
        jobs_in_progress=1,
        jobs_processed=2,
        jobs=(stats,),
        duration_bounds_s=DURATION_BOUNDS_S,
    )
    write_beat(tmp_path, written)
    (tmp_path / "worker-999.json.tmp").write_text("{half a fi", encoding="utf-8")
    (tmp_path / "worker-998.json").write_text("not json", encoding="utf-8")

    assert read_beats(tmp_path) == [written]
    assert assess(tmp_path, 3.0, window_s=5.0).healthy
    assert not assess(tmp_path, 30.0, window_s=5.0).healthy


def test_a_dead_or_wedged_background_thread_makes_the_worker_unhealthy_naming_it(tmp_path: Path) -> None:
    def beat(threads: tuple[dict[str, object], ...]) -> WorkerBeat:
        return WorkerBeat(
            pid=os.getpid(),
            worker_id="host:1:abc",
            process_start=process_start(os.getpid()),
            started_at=1.0,
            heartbeat_at=100.0,
            written_at=100.0,
            state="running",
            jobs_in_progress=0,
            jobs_processed=0,
            threads=threads,
        )

    fine = {"name": "queue-heartbeat", "alive": True, "last_tick": 99.0, "stale_after_s": 30.0, "restarts": 1}
    write_beat(tmp_path, beat((fine,)))
    assert assess(tmp_path, 100.0, window_s=5.0).healthy

    dead = {**fine, "name": "queue-acks", "alive": False, "last_error": "RuntimeError: boom"}
    write_beat(tmp_path, beat((fine, dead)))
    [problem] = assess(tmp_path, 100.0, window_s=5.0).problems
    assert "background thread queue-acks is dead (last error: RuntimeError: boom)" in problem

    wedged = {**fine, "name": "queue-watchdog", "last_tick": 50.0, "stale_after_s": 10.0}
    write_beat(tmp_path, beat((fine, wedged)))
    [problem] = assess(tmp_path, 100.0, window_s=5.0).problems
    assert "background thread queue-watchdog has not ticked for 50.0 s, over its 10.0 s window" in problem
