"""A psycopg pool that calls the queue's SQL functions: how the direct transport and its backends talk."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.errors
from psycopg.rows import RowFactory, dict_row, tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from broker.errors import ConnectionClosed, QueueAccessDenied, QueueError, QueueSchemaMissing

#: Seconds a call may wait for a pooled connection before it counts as a lost connection.
DEFAULT_POOL_TIMEOUT_S = 10.0
#: Connections per pool: calls are single short statements, so a few serve many worker threads.
DEFAULT_POOL_SIZE = 4
#: Pooled connections a repeated call tries (each checked with an empty query) before it gives up.
VERIFY_TRIES = 8


def translate_error(exc: psycopg.Error) -> Exception:
    """Map a driver error to the queue's errors: lost connections become Dramatiq's ConnectionClosed."""
    if isinstance(exc, psycopg.errors.UndefinedFunction | psycopg.errors.UndefinedTable):
        return QueueSchemaMissing(exc.diag.message_primary or type(exc).__name__)
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return QueueAccessDenied(exc.diag.message_primary or "permission denied")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return ConnectionClosed(exc)
    return QueueError(f"{type(exc).__name__}: {exc.diag.message_primary or exc}")


class FunctionPool:
    """Runs one-statement calls of SQL functions on an autocommit pool, its own or a borrowed one.

    The pool opens on the first call, not here: a process that imports the wiring and then forks (the dramatiq
    CLI) must not carry pool threads across the fork.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        pool: ConnectionPool[Any] | None = None,
        name: str,
        size: int = DEFAULT_POOL_SIZE,
        timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
        prepared_statements: bool = True,
    ) -> None:
        if (url is None) == (pool is None):
            raise ValueError("pass either a database URL or an autocommit psycopg ConnectionPool")
        self._owned = pool is None
        if pool is None:
            assert url is not None  # checked above; says so to the type checker
            kwargs: dict[str, Any] = {"autocommit": True, "application_name": name}
            if not prepared_statements:
                # Transaction-mode poolers (Supavisor port 6543, PgBouncer) cannot keep prepared statements.
                kwargs["prepare_threshold"] = None
            pool = ConnectionPool(
                url,
                min_size=1,
                max_size=max(size, 1),
                kwargs=kwargs,
                timeout=timeout_s,
                open=False,
                name=name,
            )
        self.pool: ConnectionPool[Any] = pool
        self._opened = not self._owned
        self._open_lock = threading.Lock()

    @contextmanager
    def _cursor(
        self, row_factory: RowFactory[Any] = tuple_row, *, verified: bool = False
    ) -> Iterator[psycopg.Cursor[Any]]:
        if not self._opened:
            with self._open_lock:
                if not self._opened:
                    self.pool.open(wait=False)
                    self._opened = True
        try:
            for _ in range(VERIFY_TRIES if verified else 1):
                with self.pool.connection() as conn:
                    if verified and not _answers(conn):
                        continue  # handed back broken: the pool drops it and opens another
                    with conn.cursor(row_factory=row_factory) as cur:
                        yield cur
                    return
            raise psycopg.OperationalError(f"no live connection in {VERIFY_TRIES} tries")
        except PoolTimeout as exc:
            raise ConnectionClosed(exc) from None
        except psycopg.Error as exc:
            error = translate_error(exc)
            if isinstance(error, ConnectionClosed) and not self.pool.closed:
                # What dropped this connection (a restart, a failover) most likely dropped its idle siblings
                # too: test them now, so the next call (or our retry) does not draw another dead one.
                self.pool.check()
            raise error from None

    def value(self, query: str, params: Sequence[Any], *, idempotent: bool) -> Any:
        """The first column of the first row of `query` (None when there is no row).

        An idempotent call is tried once more when its connection was lost, after the pool dropped its other
        dead connections: that hides connections the server closed while they sat in the pool. Other calls
        may have committed before the reply was lost, so they reach the caller as ConnectionClosed at once.
        """
        rows = self._fetch(query, params, tuple_row, idempotent)
        return rows[0][0] if rows else None

    def rows(self, query: str, params: Sequence[Any], *, idempotent: bool) -> list[dict[str, Any]]:
        """Every row of `query` as a dict; retried like `value`."""
        rows: list[dict[str, Any]] = self._fetch(query, params, dict_row, idempotent)
        return rows

    def _fetch(
        self, query: str, params: Sequence[Any], row_factory: RowFactory[Any], idempotent: bool
    ) -> Any:
        attempts = 2 if idempotent else 1
        for attempt in range(1, attempts + 1):
            try:
                # The repeat runs on a connection known to be alive: a server that is dropping its sessions
                # (pg_terminate_backend, a restart) answers a pooled connection's check before it goes.
                with self._cursor(row_factory, verified=attempt > 1) as cur:
                    return cur.execute(query, params).fetchall()
            except ConnectionClosed:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the pool if it is ours; a borrowed pool belongs to whoever lent it."""
        if self._owned and self._opened:
            self.pool.close()


def _answers(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("")
    except psycopg.OperationalError:
        return False
    return True
