"""The direct PostgreSQL transport: psycopg 3 with a connection pool, LISTEN for wake-ups."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from broker.errors import DATABASE_LOGIN_HINT, ConnectionClosed, QueueAccessDenied
from broker.function_pool import DEFAULT_POOL_TIMEOUT_S, FunctionPool, translate_error
from broker.listen import APPLICATION_NAME, ListenDoorbell
from broker.transport import (
    Claim,
    ClaimedJob,
    Doorbell,
    HeartbeatReply,
    NewJob,
    PlanStat,
    PresenceListener,
    PresencePolicy,
    QueueStat,
    Transport,
    WorkerInfo,
    plan_stat,
)

#: Seconds a new connection may take to open.
CONNECT_TIMEOUT_S = 10
#: What the server says when it refuses a login for good (a restart will not change it): wrong password,
#: unknown role or database, no pg_hba.conf entry, no CONNECT privilege, a role that may not log in, and what
#: Supabase's pooler says for an unknown tenant. libpq has no SQLSTATE for a failed connection, only text.
_REFUSED_LOGIN = re.compile(
    r"password authentication failed|role \S+ does not exist|database \S+ does not exist"
    r"|no pg_hba\.conf entry|permission denied for database|is not permitted to log in"
    r"|tenant or user not found",
    re.IGNORECASE,
)
#: With a session to hold a lock: the lock says a worker lives, the heartbeat (each second) runs the rescue.
LOCK_PRESENCE = PresencePolicy(mode="lock", heartbeat_interval_s=1.0, stale_after_ms=60_000)
#: Behind a transaction pooler: heartbeats each second, dead after five silent seconds.
HEARTBEAT_PRESENCE = PresencePolicy(mode="heartbeat", heartbeat_interval_s=1.0, stale_after_ms=5_000)


def login_error(exc: psycopg.OperationalError) -> Exception:
    """A failed connection as the queue's error: a refused login is for the operator; the rest may pass."""
    message = str(exc).strip()
    if _REFUSED_LOGIN.search(message):
        # libpq's message names the host, port and user, never the password.
        return QueueAccessDenied(message.removeprefix("connection failed: "), DATABASE_LOGIN_HINT)
    return ConnectionClosed(exc)


def _claims(claims: Sequence[Claim]) -> tuple[list[str], list[str]]:
    return [c.job_id for c in claims], [c.claim_token for c in claims]


class PostgresTransport(Transport):
    """The queue over a direct (or session-mode pooler) PostgreSQL connection.

    In poll-only mode (transaction-mode poolers) there is no LISTEN and no prepared statements, and workers
    heartbeat instead of holding a session lock. Every call is retried once on a fresh connection when its
    connection was lost: settling calls are fenced by a claim token, an enqueue by its message ids, and a
    claim by the claim token the caller chose, so a repeat whose first reply was lost changes nothing more.
    """

    def __init__(self, url: str, *, pool_size: int = 4, poll_only: bool = False) -> None:
        self.url = url
        self.poll_only = poll_only
        #: Also lent to the result backends, so the whole worker shares one pool.
        self.calls = FunctionPool(
            url,
            name=APPLICATION_NAME,
            size=pool_size,
            timeout_s=DEFAULT_POOL_TIMEOUT_S,
            prepared_statements=not poll_only,
        )

    def check_schema(self) -> None:
        """Raise QueueAccessDenied for a refused login, QueueSchemaMissing without the migrations, and
        ConnectionClosed when the database does not answer.

        On a connection of its own, not the pool: the pool retries a refused login in the background until
        its timeout, which would make a wrong password look like an unreachable database.
        """
        try:
            with psycopg.connect(
                self.url,
                connect_timeout=CONNECT_TIMEOUT_S,
                autocommit=True,
                application_name=APPLICATION_NAME,
            ) as conn:
                conn.execute("select public.queue_ping()")
                conn.execute("select 'public.claim_jobs(text, text, integer, integer, uuid)'::regprocedure")
        except psycopg.OperationalError as exc:
            raise login_error(exc) from None
        except psycopg.Error as exc:
            raise translate_error(exc) from None

    def enqueue(self, jobs: Sequence[NewJob]) -> int:
        payload = Jsonb([job.as_json() for job in jobs])
        return int(self.calls.value("select public.enqueue_jobs(%s)", (payload,), idempotent=True) or 0)

    def enqueue_unique(self, job: NewJob) -> str:
        query = "select public.enqueue_unique_job(%s)"
        return str(self.calls.value(query, (Jsonb(job.as_json()),), idempotent=True))

    def claim(
        self, worker_id: str, queue_name: str, limit: int, lease_ms: int, claim_token: str
    ) -> list[ClaimedJob]:
        rows = self.calls.rows(
            "select * from public.claim_jobs(%s, %s, %s, %s, %s::uuid)",
            (worker_id, queue_name, limit, lease_ms, claim_token),
            idempotent=True,
        )
        return [ClaimedJob.from_row(row) for row in rows]

    def complete_many(self, claims: Sequence[Claim]) -> set[str]:
        if not claims:
            return set()
        query = "select public.complete_jobs(%s::uuid[], %s::uuid[]) as id"
        return {str(row["id"]) for row in self.calls.rows(query, _claims(claims), idempotent=True)}

    def retry(self, claim: Claim, delay_ms: int, error: str, options: dict[str, Any]) -> bool:
        params = (claim.job_id, claim.claim_token, delay_ms, error, Jsonb(options))
        return bool(self.calls.value("select public.retry_job(%s, %s, %s, %s, %s)", params, idempotent=True))

    def dead_letter(self, claim: Claim, error: str) -> bool:
        params = (claim.job_id, claim.claim_token, error)
        return bool(self.calls.value("select public.dead_letter_job(%s, %s, %s)", params, idempotent=True))

    def release(self, claims: Sequence[Claim]) -> int:
        if not claims:
            return 0
        query = "select public.release_jobs(%s::uuid[], %s::uuid[])"
        return int(self.calls.value(query, _claims(claims), idempotent=True) or 0)

    def postpone(self, claim: Claim, delay_ms: int, note: str, options: dict[str, Any] | None) -> bool:
        params = (
            claim.job_id,
            claim.claim_token,
            delay_ms,
            note,
            None if options is None else Jsonb(options),
        )
        query = "select public.postpone_job(%s, %s, %s, %s, %s)"
        return bool(self.calls.value(query, params, idempotent=True))

    def presence_policy(self) -> PresencePolicy:
        return HEARTBEAT_PRESENCE if self.poll_only else LOCK_PRESENCE

    def register_worker(self, worker: WorkerInfo, policy: PresencePolicy) -> None:
        if policy.mode == "lock":
            raise ValueError("a lock-presence worker registers on its own session, through the doorbell")
        query = "select public.register_worker(%s, %s, %s, %s, %s, %s, %s)"
        params = (
            worker.worker_id,
            policy.mode,
            policy.stale_after_ms,
            worker.hostname,
            worker.pid,
            list(worker.queues),
            worker.concurrency,
        )
        self.calls.value(query, params, idempotent=True)

    def heartbeat(
        self,
        worker_id: str,
        claims: Sequence[Claim],
        *,
        lease_ms: int | None,
        queues: Sequence[str],
        max_rescues: int,
    ) -> HeartbeatReply:
        ids, tokens = _claims(claims)
        query = "select * from public.worker_heartbeat(%s, %s::uuid[], %s::uuid[], %s, %s::text[], %s)"
        params = (worker_id, ids, tokens, lease_ms, list(queues), max_rescues)
        [row] = self.calls.rows(query, params, idempotent=True)
        return HeartbeatReply(
            registered=bool(row["registered"]),
            held=frozenset(str(job_id) for job_id in row["held"] or ()),
            rescued=int(row["rescued"] or 0),
        )

    def deregister_worker(self, worker_id: str) -> None:
        self.calls.value("select public.deregister_worker(%s)", (worker_id,), idempotent=True)

    def rescue(self, max_rescues: int) -> int:
        return int(self.calls.value("select public.rescue_jobs(%s)", (max_rescues,), idempotent=True) or 0)

    def purge(self, queue_name: str) -> int:
        return int(self.calls.value("select public.purge_queue(%s)", (queue_name,), idempotent=True) or 0)

    def stats(self) -> list[QueueStat]:
        rows = self.calls.rows("select * from public.get_queue_stats()", (), idempotent=True)
        return [
            QueueStat(
                queue_name=row["queue_name"],
                status=str(row["status"]),
                jobs=int(row["jobs"]),
                oldest_created_at=row["oldest_created_at"],
                next_run_at=row["next_run_at"],
            )
            for row in rows
        ]

    def fairness(self) -> list[PlanStat]:
        rows = self.calls.rows("select * from public.get_fairness_stats()", (), idempotent=True)
        return [plan_stat(row) for row in rows]

    def consumers(self) -> dict[str, int]:
        rows = self.calls.rows("select * from public.get_queue_consumers()", (), idempotent=True)
        return {row["queue_name"]: int(row["workers"]) for row in rows}

    def ping(self, timeout_s: float) -> None:
        # A fresh connection, not the pool: readiness must not queue behind busy worker threads.
        try:
            with psycopg.connect(
                self.url,
                connect_timeout=max(1, round(timeout_s)),
                autocommit=True,
                application_name=APPLICATION_NAME,
            ) as conn:
                timeout = f"{int(timeout_s * 1000)}ms"
                conn.execute("select set_config('statement_timeout', %s, false)", (timeout,))
                conn.execute("select public.queue_ping()")
        except psycopg.Error as exc:
            raise ConnectionClosed(exc) from None

    def doorbell(
        self, worker: WorkerInfo | None = None, presence: PresenceListener | None = None
    ) -> Doorbell | None:
        if self.poll_only:
            return None
        return ListenDoorbell(
            self.url, worker=worker, presence=presence, policy=LOCK_PRESENCE, probe=self.probe_doorbell
        )

    def probe_doorbell(self, token: str) -> None:
        """Ring a probe that wakes nobody, from the pool: the LISTEN connection must hear it."""
        self.calls.value("select public.queue_probe_doorbell(%s)", (token,), idempotent=True)

    def close(self) -> None:
        self.calls.close()
