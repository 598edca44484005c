"""Prometheus collectors for /metrics: queue depth from the cached stats, job counts from heartbeat files.

Job counts live in the worker processes, and /metrics is served by another process. Rather than
prometheus-client's multiprocess mode (an environment variable that must be set before the library is
imported in every process, plus a folder of mmap files to clean up), each worker writes its counts into the
heartbeat file it writes anyway, and a custom collector sums them at scrape time. The counts restart with
the worker processes, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from broker.operator_records import PlanStat
from health.job_counters import DURATION_BOUNDS_S, ActorJobStats
from health.monitor import STATUSES
from health.run_folder import WorkerBeat, process_running, read_beats
from health.stats_cache import StatsCache, StatsReading


class QueueStatsCollector:
    """Queue depth by queue and status from get_queue_stats(), through the shared cache."""

    def __init__(self, cache: StatsCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        reading = self.cache.read()
        yield GaugeMetricFamily(
            "queue_stats_up",
            "1 when the last get_queue_stats() read succeeded, else 0.",
            value=int(reading.ok),
        )
        yield GaugeMetricFamily(
            "queue_stats_read_timestamp_seconds",
            "When the cached get_queue_stats() read was made.",
            reading.read_at,
        )
        if not reading.ok:
            return
        jobs = GaugeMetricFamily(
            "queue_jobs", "Jobs in the queue by queue and status.", labels=["queue", "status"]
        )
        oldest = GaugeMetricFamily(
            "queue_oldest_job_age_seconds",
            "Age of the oldest job by queue and status.",
            labels=["queue", "status"],
        )
        seen: dict[str, set[str]] = {}
        for stat in reading.stats:
            jobs.add_metric([stat.queue_name, stat.status], stat.jobs)
            seen.setdefault(stat.queue_name, set()).add(stat.status)
            if stat.oldest_created_at is not None:
                age_s = max(reading.read_at - stat.oldest_created_at.timestamp(), 0.0)
                oldest.add_metric([stat.queue_name, stat.status], age_s)
        # An empty status is a zero, not a missing series, so dashboards and alerts see it drop to 0.
        for queue_name, statuses in seen.items():
            for status in STATUSES:
                if status not in statuses:
                    jobs.add_metric([queue_name, status], 0)
        yield jobs
        yield oldest
        yield from _alerts(reading, sorted(seen))
        consumers = GaugeMetricFamily(
            "queue_consumers",
            "Registered worker processes consuming each queue (0 with jobs pending: nobody runs them).",
            labels=["queue"],
        )
        counted = dict(reading.consumers)
        for queue_name in sorted(set(seen) | set(counted)):
            consumers.add_metric([queue_name], counted.get(queue_name, 0))
        yield consumers
        yield from _plan_metrics(reading.plans, reading.read_at)


def _plan_metrics(plans: Iterable[PlanStat], read_at: float) -> Iterator[Metric]:
    """Fair share by plan: caps, running jobs and users, and jobs waiting for their user's cap."""
    labels = ["plan"]
    cap = GaugeMetricFamily(
        "queue_plan_max_running", "Running jobs allowed per user of the plan (absent: no cap).", labels=labels
    )
    running = GaugeMetricFamily("queue_plan_running_jobs", "Jobs of the plan's users running.", labels=labels)
    users = GaugeMetricFamily(
        "queue_plan_running_users", "Users of the plan with jobs running.", labels=labels
    )
    at_cap = GaugeMetricFamily(
        "queue_plan_users_at_cap", "Users of the plan running as many jobs as their cap.", labels=labels
    )
    capped = GaugeMetricFamily(
        "queue_plan_capped_pending_jobs",
        "Due jobs waiting because their user is at the plan's cap (not for lack of workers).",
        labels=labels,
    )
    oldest = GaugeMetricFamily(
        "queue_plan_oldest_pending_age_seconds",
        "Age of the oldest due pending job of the plan's tier (0 when none is waiting).",
        labels=labels,
    )
    for plan in plans:
        if plan.max_running is not None:
            cap.add_metric([plan.plan], plan.max_running)
        running.add_metric([plan.plan], plan.running_jobs)
        users.add_metric([plan.plan], plan.running_users)
        at_cap.add_metric([plan.plan], plan.users_at_cap)
        capped.add_metric([plan.plan], plan.capped_pending_jobs)
        age_s = 0.0 if plan.oldest_pending_at is None else read_at - plan.oldest_pending_at.timestamp()
        oldest.add_metric([plan.plan], max(age_s, 0.0))
    yield from (cap, running, users, at_cap, capped, oldest)


def _alerts(reading: StatsReading, queues: list[str]) -> Iterator[Metric]:
    """What an operator alerts on besides depth: how long due jobs wait, jobs per actor, paused queues."""
    waiting = GaugeMetricFamily(
        "queue_oldest_pending_wait_seconds",
        "How long the longest-waiting due pending job has waited since it was due (jobs delayed into the "
        "future do not count); 0 when none is due.",
        labels=["queue"],
    )
    due = {s.queue_name: s.oldest_due_at for s in reading.stats if s.status == "pending" and s.oldest_due_at}
    for queue_name in queues:
        due_at = due.get(queue_name)
        wait_s = 0.0 if due_at is None else max(reading.read_at - due_at.timestamp(), 0.0)
        waiting.add_metric([queue_name], wait_s)
    yield waiting
    actors = GaugeMetricFamily(
        "queue_actor_jobs", "Jobs by queue, actor and status.", labels=["queue", "actor", "status"]
    )
    transitions = CounterMetricFamily(
        "queue_job_transitions",
        "Jobs that entered each status since the counts began: enqueues and retries (pending), claims "
        "(processing), completions, failures, cancellations.",
        labels=["queue", "actor", "status"],
    )
    for stat in reading.actors:
        actors.add_metric([stat.queue_name, stat.actor_name, stat.status], stat.jobs)
        transitions.add_metric([stat.queue_name, stat.actor_name, stat.status], stat.entered)
    yield actors
    yield transitions
    paused = GaugeMetricFamily("queue_paused", "1 while an operator has paused the queue.", labels=["queue"])
    paused_names = {p.queue_name for p in reading.paused}
    for queue_name in sorted(set(queues) | paused_names):
        paused.add_metric([queue_name], int(queue_name in paused_names))
    yield paused


class WorkerJobsCollector:
    """Job counts and durations summed over the worker processes' heartbeat files."""

    def __init__(self, run_dir: Path, master_pid: int | None = None) -> None:
        self.run_dir = run_dir
        self.master_pid = master_pid

    def collect(self) -> Iterator[Metric]:
        beats = read_beats(self.run_dir, master_pid=self.master_pid)
        live = [beat for beat in beats if process_running(beat.pid, beat.process_start)]
        yield GaugeMetricFamily("worker_processes", "Worker processes running.", value=len(live))
        yield GaugeMetricFamily(
            "worker_jobs_in_progress", "Jobs running now.", value=sum(beat.jobs_in_progress for beat in live)
        )
        yield _heartbeat_ages(beats)
        yield from _job_metrics(_merge(beats))


def _heartbeat_ages(beats: Iterable[WorkerBeat]) -> GaugeMetricFamily:
    ages = GaugeMetricFamily(
        "worker_last_heartbeat_age_seconds",
        "Seconds since each worker process's consumer last ticked.",
        labels=["pid"],
    )
    now = time.time()
    for beat in beats:
        ages.add_metric([str(beat.pid)], max(now - beat.heartbeat_at, 0.0))
    return ages


def _merge(beats: Iterable[WorkerBeat]) -> list[ActorJobStats]:
    """Sum each (queue, actor) over processes; a file with other histogram bounds adds only its counts."""
    merged: dict[tuple[str, str], ActorJobStats] = {}
    for beat in beats:
        same_bounds = beat.duration_bounds_s == DURATION_BOUNDS_S
        for job in beat.jobs:
            total = merged.setdefault(
                (job.queue_name, job.actor_name), ActorJobStats(job.queue_name, job.actor_name)
            )
            total.processed += job.processed
            total.failed += job.failed
            total.retried += job.retried
            if same_bounds and len(job.duration_counts) == len(total.duration_counts):
                total.duration_sum_s += job.duration_sum_s
                total.duration_counts = [
                    a + b for a, b in zip(total.duration_counts, job.duration_counts, strict=True)
                ]
    return list(merged.values())


def _job_metrics(jobs: list[ActorJobStats]) -> Iterator[Metric]:
    labels = ["queue", "actor"]
    processed = CounterMetricFamily("worker_jobs_processed", "Jobs that ran to the end.", labels=labels)
    failed = CounterMetricFamily("worker_jobs_failed", "Jobs dead-lettered (status failed).", labels=labels)
    retried = CounterMetricFamily("worker_jobs_retried", "Jobs rescheduled after an error.", labels=labels)
    durations = HistogramMetricFamily("worker_job_duration_seconds", "How long jobs ran.", labels=labels)
    bounds = [*(f"{bound:g}" for bound in DURATION_BOUNDS_S), "+Inf"]
    for job in jobs:
        key = [job.queue_name, job.actor_name]
        processed.add_metric(key, job.processed)
        failed.add_metric(key, job.failed)
        retried.add_metric(key, job.retried)
        cumulative, running = [], 0
        for bound, count in zip(bounds, job.duration_counts, strict=True):
            running += count
            cumulative.append((bound, running))
        durations.add_metric(key, cumulative, job.duration_sum_s)
    yield processed
    yield failed
    yield retried
    yield durations


def build_registry(cache: StatsCache, run_dir: Path, master_pid: int | None = None) -> CollectorRegistry:
    """A registry of our own (not the global one), so nothing else registered in the process leaks in."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueStatsCollector(cache))
    registry.register(WorkerJobsCollector(run_dir, master_pid))
    return registry
