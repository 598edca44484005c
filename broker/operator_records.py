"""What the operator's functions answer, as records: jobs, attempts, counts, workers, pauses, outcomes, plans.

Built from the rows of either transport (psycopg's datetimes and UUIDs, or the REST API's JSON strings).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

#: The message option that carries a periodic job's tick (ISO 8601, with its UTC offset): the scheduler in
#: worker/periodic.py sets it, the operator's views show it.
TICK_OPTION = "periodic_tick"

#: How many attempts a job keeps (the SQL trigger coding_jobs_settled's `attempts_kept`).
ATTEMPTS_KEPT = 20
#: The job statuses, in the order of the database's enum (public.job_status).
JOB_STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
#: Statuses a job does not leave on its own.
FINISHED_STATUSES = frozenset({"completed", "failed", "cancelled"})
#: Statuses retry_jobs takes jobs from.
RETRYABLE_STATUSES = ("failed", "cancelled")
#: Most jobs one list_jobs call answers (the SQL function caps it the same way).
MAX_LISTED_JOBS = 1000
#: Minutes of history the dashboard charts.
HISTORY_MINUTES = 60
#: Plan tiers are priorities 0..TOP_PRIORITY; aging raises a waiting job one step per aging step, so a pending
#: job ranks with the top tier after TOP_PRIORITY aging steps (get_fairness's top_tier_after_ms).
TOP_PRIORITY = 10


def parse_time(value: Any) -> datetime | None:
    """A timestamp as either transport returns it: a datetime (psycopg) or ISO 8601 text (PostgREST)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def _id(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One run of a job: when, on which worker, how it ended ('completed', 'failed', 'lost' with its worker,
    'released' unrun or at shutdown, 'cancelled', or 'running' still) and the start of its error."""

    attempt: int
    worker: str | None
    started_at: datetime | None
    ended_at: datetime | None
    outcome: str
    error: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Attempt:
        return cls(
            attempt=int(data.get("attempt") or 0),
            worker=data.get("worker"),
            started_at=parse_time(data.get("started_at")),
            ended_at=parse_time(data.get("ended_at")),
            outcome=str(data.get("outcome") or "unknown"),
            error=data.get("error"),
        )


def _job_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The fields list_jobs() and get_job() rows share, converted alike."""
    return {
        "id": str(row["id"]),
        "queue_name": row["queue_name"],
        "actor_name": row["actor_name"],
        "status": str(row["status"]),
        "priority": int(row["priority"]),
        "retry_count": int(row["retry_count"]),
        "max_retries": int(row["max_retries"]),
        "rescue_count": int(row["rescue_count"]),
        "user_id": _id(row["user_id"]),
        "created_at": parse_time(row["created_at"]),
        "run_at": parse_time(row["run_at"]),
        "started_at": parse_time(row["started_at"]),
        "completed_at": parse_time(row["completed_at"]),
        "locked_by": row["locked_by"],
        "lease_expires_at": parse_time(row["lease_expires_at"]),
        "cancel_requested_at": parse_time(row["cancel_requested_at"]),
    }


@dataclasses.dataclass(frozen=True, slots=True)
class JobSummary:
    """One line of list_jobs(): the prompt and the error as excerpts."""

    id: str
    queue_name: str
    actor_name: str
    status: str
    priority: int
    retry_count: int
    max_retries: int
    rescue_count: int
    user_id: str | None
    created_at: datetime | None
    run_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    locked_by: str | None
    lease_expires_at: datetime | None
    cancel_requested_at: datetime | None
    attempts: int
    error: str | None
    prompt: str | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> JobSummary:
        return cls(
            **_job_fields(row),
            attempts=int(row["attempts"] or 0),
            error=row["error"],
            prompt=row["prompt"],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class JobDetail:
    """One job as get_job() shows it: its last ATTEMPTS_KEPT attempts, the prompt as an excerpt."""

    id: str
    queue_name: str
    actor_name: str
    status: str
    priority: int
    retry_count: int
    max_retries: int
    rescue_count: int
    user_id: str | None
    session_id: str | None
    project_id: str | None
    created_at: datetime | None
    run_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    locked_by: str | None
    lease_expires_at: datetime | None
    cancel_requested_at: datetime | None
    error_message: str | None
    prompt: str | None
    prompt_length: int | None
    options: dict[str, Any]
    attempts: tuple[Attempt, ...]
    #: The key a producer gave (kept while the job is pending or running; released when it ends).
    idempotency_key: str | None = None

    @property
    def periodic_tick(self) -> str | None:
        """The schedule's tick a periodic job was enqueued for (None for other jobs)."""
        tick = self.options.get(TICK_OPTION)
        return tick if isinstance(tick, str) else None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> JobDetail:
        options = row["options"]
        return cls(
            **_job_fields(row),
            session_id=_id(row["session_id"]),
            project_id=_id(row["project_id"]),
            error_message=row["error_message"],
            prompt=row["prompt"],
            prompt_length=row["prompt_length"],
            options=options if isinstance(options, dict) else {},
            attempts=tuple(Attempt.from_json(a) for a in row["attempts"] or () if isinstance(a, dict)),
            idempotency_key=row.get("idempotency_key"),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ActorStat:
    """Jobs of one actor on one queue in one status now, and how many ever entered that status."""

    queue_name: str
    actor_name: str
    status: str
    jobs: int
    entered: int

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ActorStat:
        status = str(row["status"])
        return cls(row["queue_name"], row["actor_name"], status, int(row["jobs"]), int(row["entered"]))


@dataclasses.dataclass(frozen=True, slots=True)
class QueueMinute:
    """One minute of one queue and status: jobs that entered it, and the depth (active statuses only)."""

    minute: datetime
    queue_name: str
    status: str
    entered: int
    depth: int | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> QueueMinute:
        minute = parse_time(row["minute"])
        assert minute is not None  # the column is not null
        depth = None if row["depth"] is None else int(row["depth"])
        return cls(minute, row["queue_name"], str(row["status"]), int(row["entered"]), depth)


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A registered worker process and the jobs it holds now."""

    worker_id: str
    hostname: str | None
    pid: int | None
    presence: str
    queues: tuple[str, ...]
    concurrency: int | None
    started_at: datetime | None
    heartbeat_at: datetime | None
    lost_at: datetime | None
    jobs: tuple[str, ...]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> WorkerRecord:
        return cls(
            worker_id=row["worker_id"],
            hostname=row["hostname"],
            pid=row["pid"],
            presence=row["presence"],
            queues=tuple(row["queues"] or ()),
            concurrency=row["concurrency"],
            started_at=parse_time(row["started_at"]),
            heartbeat_at=parse_time(row["heartbeat_at"]),
            lost_at=parse_time(row["lost_at"]),
            jobs=tuple(str(job_id) for job_id in row["jobs"] or ()),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class PausedQueue:
    """A queue no worker claims from until it is resumed."""

    queue_name: str
    paused_at: datetime | None
    reason: str | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PausedQueue:
        return cls(row["queue_name"], parse_time(row["paused_at"]), row["reason"])


@dataclasses.dataclass(frozen=True, slots=True)
class CancelOutcome:
    """What a cancellation did to one job: 'cancelled' (it will never run), 'cancelling' (its worker is
    stopping it), the status of a job that had already finished, or 'not_found'."""

    job_id: str
    outcome: str


@dataclasses.dataclass(frozen=True, slots=True)
class RetriedJob:
    """A finished job retry_jobs put back in the queue (or, in a dry run, would)."""

    id: str
    queue_name: str
    actor_name: str
    status: str
    error: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class PruneResult:
    """How many finished jobs one prune deleted, and whether a full load went (more may be waiting)."""

    deleted: int
    more: bool


@dataclasses.dataclass(frozen=True, slots=True)
class PlanLimit:
    """One plan of get_plan_limits(): the priorities of its tier and its cap on one user's running jobs."""

    plan: str
    #: The tier's lowest priority and its highest (the next plan's lowest, less one; or TOP_PRIORITY).
    priority: int
    max_priority: int
    #: Running jobs allowed per user; None: no cap.
    max_running: int | None
    updated_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PlanLimit:
        return cls(
            plan=row["plan"],
            priority=int(row["priority"]),
            max_priority=int(row["max_priority"]),
            max_running=_count(row["max_running"]),
            updated_at=parse_time(row["updated_at"]),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class PlanStat:
    """One line of get_fairness_stats(): a plan's cap and how its users' jobs stand (/metrics, monitor)."""

    plan: str
    #: The lowest priority of the plan's tier.
    priority: int
    #: Running jobs allowed per user; None: no cap.
    max_running: int | None
    running_jobs: int
    running_users: int
    users_at_cap: int
    #: Due pending jobs whose user is at the cap: waiting for a slot of their own, not for a worker.
    capped_pending_jobs: int
    #: Creation time of the oldest due pending job of the tier.
    oldest_pending_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PlanStat:
        return cls(
            plan=row["plan"],
            priority=int(row["priority"]),
            max_running=None if row["max_running"] is None else int(row["max_running"]),
            running_jobs=int(row["running_jobs"]),
            running_users=int(row["running_users"]),
            users_at_cap=int(row["users_at_cap"]),
            capped_pending_jobs=int(row["capped_pending_jobs"]),
            oldest_pending_at=parse_time(row["oldest_pending_at"]),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class PlanShare:
    """One plan as the operator sees it: its tier and cap (get_plan_limits) and how its users' jobs stand
    (get_fairness_stats)."""

    plan: str
    priority: int
    max_priority: int
    max_running: int | None
    running_jobs: int
    running_users: int
    users_at_cap: int
    #: Due pending jobs whose user is at the cap: waiting for a slot of their own, not for a worker.
    capped_pending_jobs: int
    #: Creation time of the oldest due pending job of the tier.
    oldest_pending_at: datetime | None

    @classmethod
    def of(cls, limit: PlanLimit, stat: PlanStat | None) -> PlanShare:
        """A plan's limit and its get_fairness_stats() line (None: the plan is newer than the stats)."""
        return cls(
            plan=limit.plan,
            priority=limit.priority,
            max_priority=limit.max_priority,
            max_running=limit.max_running,
            running_jobs=stat.running_jobs if stat else 0,
            running_users=stat.running_users if stat else 0,
            users_at_cap=stat.users_at_cap if stat else 0,
            capped_pending_jobs=stat.capped_pending_jobs if stat else 0,
            oldest_pending_at=stat.oldest_pending_at if stat else None,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class FairnessSettings:
    """The fair share switch and aging step (get_fairness): off, claims take the highest priority, then the
    oldest, with no caps."""

    enabled: bool
    #: milliseconds of waiting that raise a pending job's effective priority by one step
    aging_step_ms: int
    #: milliseconds after which a pending job ranks with the top tier (TOP_PRIORITY aging steps)
    top_tier_after_ms: int
    updated_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> FairnessSettings:
        return cls(
            enabled=bool(row["enabled"]),
            aging_step_ms=int(row["aging_step_ms"]),
            top_tier_after_ms=int(row["top_tier_after_ms"]),
            updated_at=parse_time(row["updated_at"]),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs a list or a retry means; every field given must hold."""

    status: str | None = None
    queue_name: str | None = None
    actor_name: str | None = None
    #: A piece of the error text, case-insensitive.
    error: str | None = None
    user_id: str | None = None
    job_ids: tuple[str, ...] | None = None


def job_uuid(job_id: str) -> str:
    """A job id as the database spells it; raises ValueError for text that is not a UUID."""
    return str(uuid.UUID(str(job_id)))
