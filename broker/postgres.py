"""The direct PostgreSQL transport: psycopg 3 with a connection pool, LISTEN for wake-ups."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from broker.errors import ConnectionClosed, QueueAccessDenied, QueueError, QueueSchemaMissing
from broker.transport import Claim, ClaimedJob, Doorbell, NewJob, QueueStat, RingCallback, Transport

T = TypeVar("T")

#: The channel the queue's triggers notify on.
NOTIFY_CHANNEL = "coding_jobs"
#: Seconds a pooled connection may take to come free before a call counts as a lost connection.
POOL_TIMEOUT_S = 10.0
#: Seconds the LISTEN thread waits for a notification before checking whether it should stop.
LISTEN_WAKE_S = 0.25
#: Seconds between reconnect attempts of the LISTEN connection.
LISTEN_RETRY_S = 1.0
#: Application name shown in pg_stat_activity, so operators can tell worker connections apart.
APPLICATION_NAME = "queue-worker"


def _translate(exc: psycopg.Error) -> Exception:
    """Map a driver error to the queue's errors: lost connections become ConnectionClosed."""
    if isinstance(exc, psycopg.errors.UndefinedFunction | psycopg.errors.UndefinedTable):
        return QueueSchemaMissing(exc.diag.message_primary or type(exc).__name__)
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return QueueAccessDenied(exc.diag.message_primary or "permission denied")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return ConnectionClosed(exc)
    return QueueError(f"{type(exc).__name__}: {exc.diag.message_primary or exc}")


def _claims(claims: Sequence[Claim]) -> tuple[list[str], list[str]]:
    return [c.job_id for c in claims], [c.claim_token for c in claims]


class PostgresTransport(Transport):
    """The queue over a direct (or session-mode pooler) PostgreSQL connection.

    In poll-only mode (transaction-mode poolers) there is no LISTEN and no prepared statements.
    """

    def __init__(self, url: str, *, pool_size: int = 4, poll_only: bool = False) -> None:
        self.url = url
        self.poll_only = poll_only
        kwargs: dict[str, Any] = {"autocommit": True, "application_name": APPLICATION_NAME}
        if poll_only:
            kwargs["prepare_threshold"] = None
        self.pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max(pool_size, 1),
            kwargs={**kwargs, "row_factory": dict_row},
            timeout=POOL_TIMEOUT_S,
            open=False,
            name="queue",
        )
        self._opened = False
        self._open_lock = threading.Lock()

    def _open(self) -> None:
        with self._open_lock:
            if not self._opened:
                self.pool.open(wait=False)
                self._opened = True

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        if not self._opened:
            self._open()
        try:
            with self.pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise ConnectionClosed(exc) from None
        except psycopg.Error as exc:
            raise _translate(exc) from None

    def _call(self, query: str, params: Sequence[Any], fetch: Callable[[psycopg.Cursor[Any]], T]) -> T:
        # Idempotent-or-fenced calls: one immediate retry on a fresh connection hides a connection the server
        # dropped while it sat in the pool; a second failure reaches Dramatiq as ConnectionClosed.
        for attempt in (1, 2):
            try:
                with self._connection() as conn:
                    return fetch(conn.execute(query, params))
            except ConnectionClosed:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def check_schema(self) -> None:
        self._call("select 1 from public.get_queue_stats() limit 0", (), lambda cur: cur.fetchall())
        self._call(
            "select 'public.claim_jobs(text, text, integer, integer)'::regprocedure",
            (),
            lambda cur: cur.fetchone(),
        )

    def enqueue(self, jobs: Sequence[NewJob]) -> int:
        payload = Jsonb([job.as_json() for job in jobs])
        # Not retried: a lost reply could hide a committed insert; ids make a producer's own retry harmless.
        with self._connection() as conn:
            row = conn.execute("select public.enqueue_jobs(%s) as n", (payload,)).fetchone()
        return int(row["n"]) if row else 0

    def claim(self, worker_id: str, queue_name: str, limit: int, lease_ms: int) -> list[ClaimedJob]:
        # Not retried either: a claim lost after commit is returned by its lease.
        with self._connection() as conn:
            rows = conn.execute(
                "select * from public.claim_jobs(%s, %s, %s, %s)", (worker_id, queue_name, limit, lease_ms)
            ).fetchall()
        return [ClaimedJob.from_row(row) for row in rows]

    def complete_many(self, claims: Sequence[Claim]) -> set[str]:
        if not claims:
            return set()
        ids, tokens = _claims(claims)
        rows = self._call(
            "select public.complete_jobs(%s::uuid[], %s::uuid[]) as id",
            (ids, tokens),
            lambda cur: cur.fetchall(),
        )
        return {str(row["id"]) for row in rows}

    def retry(self, claim: Claim, delay_ms: int, error: str, options: dict[str, Any]) -> bool:
        return self._scalar(
            "select public.retry_job(%s, %s, %s, %s, %s)",
            (claim.job_id, claim.claim_token, delay_ms, error, Jsonb(options)),
        )

    def dead_letter(self, claim: Claim, error: str) -> bool:
        return self._scalar(
            "select public.dead_letter_job(%s, %s, %s)", (claim.job_id, claim.claim_token, error)
        )

    def release(self, claims: Sequence[Claim]) -> int:
        if not claims:
            return 0
        ids, tokens = _claims(claims)
        return int(self._value("select public.release_jobs(%s::uuid[], %s::uuid[])", (ids, tokens)))

    def extend_leases(self, claims: Sequence[Claim], lease_ms: int) -> set[str]:
        if not claims:
            return set()
        ids, tokens = _claims(claims)
        rows = self._call(
            "select public.extend_leases(%s::uuid[], %s::uuid[], %s) as id",
            (ids, tokens, lease_ms),
            lambda cur: cur.fetchall(),
        )
        return {str(row["id"]) for row in rows}

    def requeue_expired_leases(self, queue_name: str | None = None) -> int:
        return int(self._value("select public.requeue_expired_leases(%s)", (queue_name,)))

    def purge(self, queue_name: str) -> int:
        return int(self._value("select public.purge_queue(%s)", (queue_name,)))

    def stats(self) -> list[QueueStat]:
        rows = self._call("select * from public.get_queue_stats()", (), lambda cur: cur.fetchall())
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
        if self._opened:
            self.pool.close()

    def _value(self, query: str, params: Sequence[Any]) -> Any:
        row = self._call(query, params, lambda cur: cur.fetchone())
        return next(iter(row.values())) if row else None

    def _scalar(self, query: str, params: Sequence[Any]) -> bool:
        return bool(self._value(query, params))


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
