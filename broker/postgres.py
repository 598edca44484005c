"""The direct PostgreSQL transport: psycopg 3 with a connection pool, LISTEN for wake-ups when it can work."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from dramatiq.logging import get_logger
from psycopg.types.json import Jsonb

from broker.deadlines import Deadlines
from broker.errors import DATABASE_LOGIN_HINT, ConnectionClosed, QueueAccessDenied
from broker.function_pool import (
    DEFAULT_POOL_TIMEOUT_S,
    DEFAULT_STATEMENT_TIMEOUT_MS,
    FunctionPool,
    translate_error,
)
from broker.listen import APPLICATION_NAME, ListenDoorbell
from broker.operations import SqlArg
from broker.polling import PollingDoorbell, PollPolicy
from broker.pooling import CachedSemantics, SessionSemantics, detect_session_semantics, poll_only
from broker.transport import (
    CLAIMED_COLUMNS,
    Claim,
    ClaimedJob,
    Doorbell,
    HeartbeatReply,
    NewJob,
    PresenceListener,
    PresencePolicy,
    QueueStat,
    Transport,
    WorkerInfo,
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


#: The claim, asking for the columns the worker reads (their names are ClaimedJob's fields, written here).
_CLAIM_SQL = f"select {', '.join(CLAIMED_COLUMNS)} from public.claim_jobs(%s, %s, %s, %s, %s::uuid)"


def _claims(claims: Sequence[Claim]) -> tuple[list[str], list[str]]:
    return [c.job_id for c in claims], [c.claim_token for c in claims]


class PostgresTransport(Transport):
    """The queue over PostgreSQL: a direct connection, or a session- or transaction-mode pooler.

    Whether the URL gives sessions of our own is found out once per process, by the worker's start-up check or
    else on first use (`session_semantics()`, broker/pooling.py). Only then do the pool's connections allow
    server-side prepared statements, does the doorbell LISTEN and hold the worker's presence lock; otherwise
    the doorbell polls (broker/polling.py) and the worker heartbeats. `poll_only` (DATABASE_POLL_ONLY) skips
    the detection and behaves as behind a transaction pooler. Every call carries its own statement timeout
    (broker/function_pool.py). Every call is retried once on a fresh connection when its connection was lost:
    settling calls are fenced by a claim token, an enqueue by its message ids, and a claim by the claim token
    the caller chose, so a repeat whose first reply was lost changes nothing more.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        poll_only: bool = False,
        application_name: str = APPLICATION_NAME,
        statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
        sessions: bool = True,
        poll_policy: PollPolicy | None = None,
    ) -> None:
        self.url = url
        self.poll_only = poll_only
        #: False for a process that needs no session state (the health server): no probe, no prepared
        #: statements.
        self.sessions = sessions
        #: When the doorbell polls (no LISTEN): how often.
        self.poll_policy = poll_policy or PollPolicy()
        self.application_name = application_name
        self.logger = get_logger(__name__, type(self))
        # A lambda: nothing of self is read while it is being built (a subclass may watch every read).
        self._semantics = CachedSemantics(lambda: self._detect())
        #: Whether the doorbell LISTENs (and so holds the presence lock); None until doorbell() decided.
        self._listens: bool | None = None
        #: Monotonic time of the last claim that found jobs: the polling doorbell's sign of a busy queue.
        self.last_work_at: float | None = None
        self._deadlines = Deadlines(f"{application_name}-check")
        #: Also lent to the result backends, so the whole worker shares one pool.
        self.calls = FunctionPool(
            url,
            name=application_name,
            size=pool_size,
            timeout_s=DEFAULT_POOL_TIMEOUT_S,
            statement_timeout_ms=statement_timeout_ms,
            prepared_statements=lambda: self.session_semantics().session_state,
        )

    def session_semantics(self) -> SessionSemantics:
        """Whether this URL gives sessions of our own (detected once per process; ConnectionClosed if it
        cannot be told, such as behind a pooler with no free server connection)."""
        return self._semantics.get()

    def _detect(self) -> SessionSemantics:
        if not self.sessions:
            return SessionSemantics(False, "this process needs no session state")
        found = poll_only() if self.poll_only else detect_session_semantics(self.url)
        kind = "sessions of our own" if found.session_state else "no session state (transaction pooling)"
        self.logger.info("Database connection: %s: %s.", kind, found.reason)
        return found

    def check_schema(self) -> None:
        """Raise QueueAccessDenied for a refused login, QueueSchemaMissing without the migrations, and
        ConnectionClosed when the database does not answer.

        On a connection of its own, not the pool: the pool retries a refused login in the background until
        its timeout, which would make a wrong password look like an unreachable database.
        """
        try:
            with (
                psycopg.connect(
                    self.url,
                    connect_timeout=CONNECT_TIMEOUT_S,
                    autocommit=True,
                    application_name=self.application_name,
                    prepare_threshold=None,
                ) as conn,
                self._deadlines.watch(conn, CONNECT_TIMEOUT_S) as watch,
            ):
                try:
                    conn.execute("select public.queue_ping()")
                    conn.execute(
                        "select 'public.claim_jobs(text, text, integer, integer, uuid)'::regprocedure"
                    )
                except psycopg.OperationalError:
                    if watch.overran:
                        raise ConnectionClosed(
                            f"the database accepted the connection but answered nothing within "
                            f"{CONNECT_TIMEOUT_S} s: a pooler whose server connections are all taken?"
                        ) from None
                    raise
        except psycopg.OperationalError as exc:
            raise login_error(exc) from None
        except psycopg.Error as exc:
            raise translate_error(exc) from None
        # Which kind of connection this is, said once at start-up (and bounded, like the check above).
        self.session_semantics()

    def enqueue(self, jobs: Sequence[NewJob]) -> int:
        if len(jobs) == 1:
            # One send(): typed parameters, nothing to unpack (enqueue_job; 20261202000400_performance.sql).
            [job] = jobs
            params = (
                job.id,
                job.queue_name,
                job.actor_name,
                Jsonb(job.args),
                Jsonb(job.kwargs),
                Jsonb(job.options),
                job.priority,
                job.max_retries,
                job.delay_ms,
            )
            query = "select public.enqueue_job(%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            return int(self.calls.value(query, params, idempotent=True) or 0)
        payload = Jsonb([job.as_json() for job in jobs])
        return int(self.calls.value("select public.enqueue_jobs(%s)", (payload,), idempotent=True) or 0)

    def enqueue_unique(self, job: NewJob) -> str:
        query = "select public.enqueue_unique_job(%s)"
        return str(self.calls.value(query, (Jsonb(job.as_json()),), idempotent=True))

    def claim(
        self, worker_id: str, queue_name: str, limit: int, lease_ms: int, claim_token: str
    ) -> list[ClaimedJob]:
        rows = self.calls.rows(
            _CLAIM_SQL, (worker_id, queue_name, limit, lease_ms, claim_token), idempotent=True
        )
        if rows:
            self.last_work_at = time.monotonic()
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

    def cancel_held(self, claims: Sequence[Claim]) -> set[str]:
        if not claims:
            return set()
        query = "select public.cancel_held_jobs(%s::uuid[], %s::uuid[]) as id"
        return {str(row["id"]) for row in self.calls.rows(query, _claims(claims), idempotent=True)}

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
        # The lock lives on the LISTEN connection, so presence follows the doorbell once doorbell() decided;
        # until then (a producer's broker) a guess that costs no connection.
        listens = (not self.poll_only) if self._listens is None else self._listens
        return LOCK_PRESENCE if listens else HEARTBEAT_PRESENCE

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
            cancel_requested=frozenset(str(job_id) for job_id in row.get("cancel_requested") or ()),
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
                oldest_due_at=row.get("oldest_due_at"),
            )
            for row in rows
        ]

    def _call_function(self, name: str, args: Mapping[str, SqlArg]) -> list[dict[str, Any]]:
        # Named notation with a cast per argument; the names and types are the operations module's own.
        named = ", ".join(f"{key} => %s::{arg.sql_type}" for key, arg in args.items())
        values = [arg.value for arg in args.values()]
        return self.calls.rows(f"select * from public.{name}({named})", values, idempotent=True)

    def consumers(self) -> dict[str, int]:
        rows = self.calls.rows("select * from public.get_queue_consumers()", (), idempotent=True)
        return {row["queue_name"]: int(row["workers"]) for row in rows}

    def ping(self, timeout_s: float) -> None:
        # Through the pool, bounded like any call but by the readiness timeout: no extra connection per probe,
        # which in a full session-mode pooler would fail readiness for want of a server connection alone.
        timeout_ms = max(1, int(timeout_s * 1000))
        # Half the time for a pooled connection: a database that is gone fails as unreachable, not as slow.
        query = "select public.queue_ping()"
        self.calls.value(query, (), idempotent=True, timeout_ms=timeout_ms, wait_s=timeout_s / 2)

    def doorbell(
        self, worker: WorkerInfo | None = None, presence: PresenceListener | None = None
    ) -> Doorbell | None:
        try:
            listens = self.session_semantics().session_state
        except ConnectionClosed as exc:
            # Polling works whatever the connection turns out to be; the calls themselves will report it.
            self.logger.warning("Could not tell whether LISTEN works here (%s); polling instead.", exc)
            listens = False
        self._listens = listens
        if listens:
            return ListenDoorbell(
                self.url, worker=worker, presence=presence, policy=LOCK_PRESENCE, probe=self.probe_doorbell
            )
        self.logger.info(
            "No LISTEN on this connection: polling for new jobs every %.0f ms when idle, %.0f ms after work.",
            self.poll_policy.idle_s * 1000,
            self.poll_policy.busy_s * 1000,
        )
        return PollingDoorbell(lambda: self.last_work_at, self.poll_policy)

    def probe_doorbell(self, token: str) -> None:
        """Ring a probe that wakes nobody, from the pool: the LISTEN connection must hear it."""
        self.calls.value("select public.queue_probe_doorbell(%s)", (token,), idempotent=True)

    def close(self) -> None:
        self.calls.close()
