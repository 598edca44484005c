"""The operator's calls: what the CLI, the dashboard and /metrics ask of the queue, in its own words.

Every call is one of the queue's SQL functions (supabase/migrations/*_operator_*.sql), made through
whichever transport the caller has: the same functions over direct PostgreSQL and over the REST API, so the
CLI, the dashboard and the metrics never hold queries of their own. `QueueOperations` implements each call
once, over `_call_function`, which each transport implements in a few lines. Rows come back as the records
of broker/operator_records.py, whatever the transport's JSON made of their timestamps and ids.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from broker.operator_records import (
    HISTORY_MINUTES,
    ActorStat,
    CancelOutcome,
    FairnessSettings,
    JobDetail,
    JobFilter,
    JobSummary,
    PausedQueue,
    PlanLimit,
    PlanShare,
    PlanStat,
    PruneResult,
    QueueMinute,
    RetriedJob,
    WorkerRecord,
    job_uuid,
)

_FUNCTION_NAME = re.compile(r"^[a-z_]+$")


class SqlArg(NamedTuple):
    """A named argument of a queue function: its value and its SQL type (for transports that cast)."""

    value: Any
    sql_type: str


class QueueOperations(abc.ABC):
    """The operator's calls, implemented once over `_call_function` (a transport supplies it)."""

    @abc.abstractmethod
    def _call_function(self, name: str, args: Mapping[str, SqlArg]) -> list[dict[str, Any]]:
        """Call public.<name> with named arguments (left out ones take their SQL default); its rows.

        `name` is one of ours (lower case and underscores); only table-returning functions are called here.
        """

    def _call(self, name: str, **args: SqlArg | None) -> list[dict[str, Any]]:
        if not _FUNCTION_NAME.match(name):
            raise ValueError(f"not a queue function name: {name!r}")
        given = {key: arg for key, arg in args.items() if arg is not None and arg.value is not None}
        return self._call_function(name, given)

    # -- reads ----------------------------------------------------------------------------------------
    def actor_stats(self) -> list[ActorStat]:
        """Jobs by queue, actor and status (get_actor_stats)."""
        return [ActorStat.from_row(row) for row in self._call("get_actor_stats")]

    def queue_history(self, minutes: int = HISTORY_MINUTES) -> list[QueueMinute]:
        """Per minute and queue: jobs entering each status, and the active statuses' depth."""
        return [
            QueueMinute.from_row(row)
            for row in self._call("get_queue_history", p_minutes=SqlArg(minutes, "integer"))
        ]

    def paused_queues(self) -> list[PausedQueue]:
        return [PausedQueue.from_row(row) for row in self._call("get_paused_queues")]

    def workers(self) -> list[WorkerRecord]:
        """The registered workers and the jobs each holds."""
        return [WorkerRecord.from_row(row) for row in self._call("get_workers")]

    def list_jobs(self, where: JobFilter | None = None, *, limit: int = 50) -> list[JobSummary]:
        where = where or JobFilter()
        rows = self._call(
            "list_jobs",
            p_status=SqlArg(where.status, "public.job_status"),
            p_queue=SqlArg(where.queue_name, "text"),
            p_actor=SqlArg(where.actor_name, "text"),
            p_error=SqlArg(where.error, "text"),
            p_user_id=SqlArg(where.user_id and job_uuid(where.user_id), "uuid"),
            p_limit=SqlArg(limit, "integer"),
        )
        return [JobSummary.from_row(row) for row in rows]

    def get_job(self, job_id: str) -> JobDetail | None:
        rows = self._call("get_job", p_job_id=SqlArg(job_uuid(job_id), "uuid"))
        return JobDetail.from_row(rows[0]) if rows else None

    def plan_limits(self) -> list[PlanLimit]:
        """The plans, lowest tier first: the priorities each covers and its cap (get_plan_limits)."""
        return [PlanLimit.from_row(row) for row in self._call("get_plan_limits")]

    def fairness(self) -> list[PlanStat]:
        """Per plan: its cap, the jobs and users running, and the jobs waiting for their user's cap."""
        return [PlanStat.from_row(row) for row in self._call("get_fairness_stats")]

    def plans(self) -> list[PlanShare]:
        """Each plan's tier and cap, and how its users' jobs stand (get_plan_limits, get_fairness_stats)."""
        stats = {stat.plan: stat for stat in self.fairness()}
        return [PlanShare.of(limit, stats.get(limit.plan)) for limit in self.plan_limits()]

    def fairness_settings(self) -> FairnessSettings:
        """The fair share switch and aging step (get_fairness)."""
        [row] = self._call("get_fairness")
        return FairnessSettings.from_row(row)

    # -- changes --------------------------------------------------------------------------------------
    def cancel(self, job_ids: Sequence[str], reason: str | None = None) -> list[CancelOutcome]:
        """Cancel jobs: pending ones never run, running ones are stopped by their worker."""
        rows = self._call(
            "cancel_jobs",
            p_job_ids=SqlArg([job_uuid(job_id) for job_id in job_ids], "uuid[]"),
            p_reason=SqlArg(reason, "text"),
        )
        return [CancelOutcome(str(row["id"]), str(row["outcome"])) for row in rows]

    def retry_jobs(
        self,
        where: JobFilter,
        *,
        every: bool = False,
        dry_run: bool = False,
        limit: int = 1000,
    ) -> list[RetriedJob]:
        """Put failed (or, with where.status, cancelled) jobs back in the queue; `dry_run` changes nothing.

        The SQL function refuses a call with no filter unless `every` says all such jobs are meant.
        """
        ids = None if where.job_ids is None else [job_uuid(job_id) for job_id in where.job_ids]
        rows = self._call(
            "retry_jobs",
            p_job_ids=SqlArg(ids, "uuid[]"),
            p_queue=SqlArg(where.queue_name, "text"),
            p_actor=SqlArg(where.actor_name, "text"),
            p_error=SqlArg(where.error, "text"),
            p_status=SqlArg(where.status, "public.job_status"),
            p_all=SqlArg(every, "boolean"),
            p_dry_run=SqlArg(dry_run, "boolean"),
            p_limit=SqlArg(limit, "integer"),
        )
        return [
            RetriedJob(str(row["id"]), row["queue_name"], row["actor_name"], str(row["status"]), row["error"])
            for row in rows
        ]

    def pause_queue(self, queue_name: str, reason: str | None = None) -> PausedQueue:
        [row] = self._call("pause_queue", p_queue=SqlArg(queue_name, "text"), p_reason=SqlArg(reason, "text"))
        return PausedQueue.from_row(row)

    def resume_queue(self, queue_name: str) -> bool:
        """True when the queue was paused."""
        [row] = self._call("resume_queue", p_queue=SqlArg(queue_name, "text"))
        return bool(row["resumed"])

    def prune(
        self, completed_ms: int | None, failed_ms: int | None, *, batch: int = 500, max_batches: int = 10
    ) -> PruneResult:
        """Delete finished jobs older than their age (None keeps them); one pruner at a time."""
        [row] = self._call(
            "prune_jobs",
            p_completed_ms=SqlArg(completed_ms, "bigint"),
            p_failed_ms=SqlArg(failed_ms, "bigint"),
            p_batch=SqlArg(batch, "integer"),
            p_max_batches=SqlArg(max_batches, "integer"),
        )
        return PruneResult(int(row["deleted"]), bool(row["more"]))

    def set_plan_limit(self, plan: str, priority: int, max_running: int | None) -> list[PlanLimit]:
        """Add a plan or change its tier's lowest priority or its cap (None: no cap); the plans after it.

        A plan that had this priority already is replaced by this one (set_plan_limit). Jobs running are never
        stopped by a lower cap: it holds from the next claim.
        """
        self._call(
            "set_plan_limit",
            p_plan=SqlArg(plan, "text"),
            p_priority=SqlArg(priority, "integer"),
            p_max_running=SqlArg(max_running, "integer"),
        )
        return self.plan_limits()

    def delete_plan_limit(self, plan: str) -> bool:
        """Forget a plan (its priorities fall under the next lower plan, or no cap); True when it existed."""
        [row] = self._call("delete_plan_limit", p_plan=SqlArg(plan, "text"))
        return bool(row["deleted"])

    def set_fairness(self, enabled: bool | None = None, aging_step_ms: int | None = None) -> FairnessSettings:
        """Turn fair share on or off and change the aging step; None leaves a setting as it is."""
        [row] = self._call(
            "set_fairness",
            p_enabled=SqlArg(enabled, "boolean"),
            p_aging_step_ms=SqlArg(aging_step_ms, "integer"),
        )
        return FairnessSettings.from_row(row)
