"""The direct PostgreSQL transport: psycopg 3 with a connection pool, LISTEN for wake-ups."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from broker.errors import DATABASE_LOGIN_HINT, ConnectionClosed, QueueAccessDenied
from broker.function_pool import DEFAULT_POOL_TIMEOUT_S, FunctionPool, translate_error
from broker.transport import Claim, ClaimedJob, Doorbell, NewJob, QueueStat, RingCallback, Transport

#: The channel the queue's triggers notify on.
NOTIFY_CHANNEL = "coding_jobs"
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
#: Seconds the LISTEN thread waits for a notification before checking whether it should stop.
LISTEN_WAKE_S = 0.25
#: Seconds between reconnect attempts of the LISTEN connection.
LISTEN_RETRY_S = 1.0
#: Application name shown in pg_stat_activity, so operators can tell worker connections apart.
APPLICATION_NAME = "queue-worker"


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

    In poll-only mode (transaction-mode poolers) there is no LISTEN and no prepared statements. Calls that
    are fenced by a claim token or change nothing are retried once on a fresh connection; an enqueue or a
    claim is not, since its lost reply may hide a commit (ids make a producer's retry harmless, and a lost
    claim comes back through its lease).
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
                conn.execute("select 'public.claim_jobs(text, text, integer, integer)'::regprocedure")
        except psycopg.OperationalError as exc:
            raise login_error(exc) from None
        except psycopg.Error as exc:
            raise translate_error(exc) from None

    def enqueue(self, jobs: Sequence[NewJob]) -> int:
        payload = Jsonb([job.as_json() for job in jobs])
        return int(self.calls.value("select public.enqueue_jobs(%s)", (payload,), idempotent=False) or 0)

    def claim(self, worker_id: str, queue_name: str, limit: int, lease_ms: int) -> list[ClaimedJob]:
        rows = self.calls.rows(
            "select * from public.claim_jobs(%s, %s, %s, %s)",
            (worker_id, queue_name, limit, lease_ms),
            idempotent=False,
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

    def extend_leases(self, claims: Sequence[Claim], lease_ms: int) -> set[str]:
        if not claims:
            return set()
        ids, tokens = _claims(claims)
        query = "select public.extend_leases(%s::uuid[], %s::uuid[], %s) as id"
        return {str(row["id"]) for row in self.calls.rows(query, (ids, tokens, lease_ms), idempotent=True)}

    def requeue_expired_leases(self, queue_name: str | None = None) -> int:
        query = "select public.requeue_expired_leases(%s)"
        return int(self.calls.value(query, (queue_name,), idempotent=True) or 0)

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

    def doorbell(self) -> Doorbell | None:
        return None if self.poll_only else ListenDoorbell(self.url)

    def close(self) -> None:
        self.calls.close()


class ListenDoorbell(Doorbell):
    """A thread holding one connection in LISTEN; reconnects forever and rings after each (re)subscribe."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None

    def start(self, ring: RingCallback) -> None:
        self._thread = threading.Thread(target=self._run, args=(ring,), name="queue-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, ring: RingCallback) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self.url,
                    autocommit=True,
                    application_name=f"{APPLICATION_NAME}-listen",
                    connect_timeout=10,
                ) as conn:
                    conn.execute(f"listen {NOTIFY_CHANNEL}")
                    ring(None, 0)  # notifications sent while we were away are lost: look once
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=LISTEN_WAKE_S):
                            queue, run_at = _parse_payload(note.payload)
                            ring(queue, run_at)
            except psycopg.Error:
                self._stopping.wait(LISTEN_RETRY_S)


def _parse_payload(payload: str) -> tuple[str | None, int]:
    try:
        data = json.loads(payload)
        return str(data["queue"]), int(data["run_at"])
    except (ValueError, KeyError, TypeError):
        return None, 0
