"""A psycopg pool that calls the queue's SQL functions: how the direct transport and its backends talk.

Every call is one simple-protocol query, `set local statement_timeout = N; select ...`, with its parameters
bound by psycopg on the client: one round trip, one implicit transaction, and so nothing that outlives the
call on the server connection (no session-level setting, no server-side prepared statement). That is what lets
the same calls run through a transaction-mode pooler (Supavisor port 6543, PgBouncer), where consecutive
transactions of one client run on different server connections shared with other clients.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.errors
from psycopg.rows import RowFactory, dict_row, tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from broker.deadlines import Deadlines
from broker.errors import ConnectionClosed, QueueAccessDenied, QueueError, QueueSchemaMissing

#: Seconds a call may wait for a pooled connection before it counts as a lost connection.
DEFAULT_POOL_TIMEOUT_S = 10.0
#: Connections per pool: calls are single short statements, so a few serve many worker threads.
DEFAULT_POOL_SIZE = 4
#: Milliseconds one call may run on the server (the queue's calls take milliseconds). It bounds our own
#: statements on our own connections, where a role setting would bound every client of that role.
DEFAULT_STATEMENT_TIMEOUT_MS = 5_000
#: Seconds a call may wait for its answer beyond its statement timeout before its connection is cut: the
#: server cannot time out a call that waits for a pooler's server connection, or a network that went silent.
ANSWER_MARGIN_S = 2.0
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


class _Overran(Exception):
    """Raised inside FunctionPool when a call's connection was cut at its deadline."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(f"no answer within {timeout_s:g} s")


class FunctionPool:
    """Runs one-statement calls of SQL functions on an autocommit pool, its own or a borrowed one.

    The pool opens on the first call, not here: a process that imports the wiring and then forks (the dramatiq
    CLI) must not carry pool threads across the fork. `prepared_statements` (or a callable deciding it when
    the pool opens) allows psycopg's automatic server-side prepared statements to whoever else runs queries on
    the pool's connections; only a connection known to be a session of our own may have them.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        pool: ConnectionPool[Any] | None = None,
        name: str,
        size: int = DEFAULT_POOL_SIZE,
        timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
        statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
        prepared_statements: bool | Callable[[], bool] = False,
    ) -> None:
        if (url is None) == (pool is None):
            raise ValueError("pass either a database URL or an autocommit psycopg ConnectionPool")
        self._owned = pool is None
        if pool is None:
            assert url is not None  # checked above; says so to the type checker
            pool = ConnectionPool(
                url,
                min_size=1,
                max_size=max(size, 1),
                kwargs={"autocommit": True, "application_name": name},
                timeout=timeout_s,
                open=False,
                name=name,
            )
        self.pool: ConnectionPool[Any] = pool
        self.statement_timeout_ms = statement_timeout_ms
        self._prepared_statements = prepared_statements
        self._deadlines = Deadlines(name)
        self._opened = not self._owned
        self._open_lock = threading.Lock()

    def _open(self) -> None:
        with self._open_lock:
            if self._opened:
                return
            allowed = self._prepared_statements
            if callable(allowed):
                allowed = allowed()
            if not allowed and isinstance(self.pool.kwargs, dict):
                self.pool.kwargs["prepare_threshold"] = None
            self.pool.open(wait=False)
            self._opened = True

    @contextmanager
    def _cursor(
        self, row_factory: RowFactory[Any], timeout_s: float, wait_s: float | None, *, verified: bool = False
    ) -> Iterator[psycopg.ClientCursor[Any]]:
        try:
            for _ in range(VERIFY_TRIES if verified else 1):
                with (
                    self.pool.connection(timeout=wait_s) as conn,
                    self._deadlines.watch(conn, timeout_s) as watch,
                ):
                    try:
                        if verified and not _answers(conn):
                            continue  # handed back broken: the pool drops it and opens another
                        with psycopg.ClientCursor(conn, row_factory=row_factory) as cur:
                            yield cur
                        return
                    except psycopg.OperationalError as exc:
                        if watch.overran:
                            raise _Overran(timeout_s) from exc
                        raise
            raise psycopg.OperationalError(f"no live connection in {VERIFY_TRIES} tries")
        except _Overran as exc:
            # Not pool.check(): testing the idle connections would wait behind the same full pooler.
            raise ConnectionClosed(
                f"no answer from the database within {exc.timeout_s:g} s (a pooler with no free server "
                "connection, or a lost network?)"
            ) from None
        except PoolTimeout as exc:
            raise ConnectionClosed(exc) from None
        except psycopg.Error as exc:
            error = translate_error(exc)
            if isinstance(error, ConnectionClosed) and not self.pool.closed:
                # What dropped this connection (a restart, a failover) most likely dropped its idle siblings
                # too: test them now, so the next call (or our retry) does not draw another dead one.
                self.pool.check()
            raise error from None

    def value(
        self,
        query: str,
        params: Sequence[Any],
        *,
        idempotent: bool,
        timeout_ms: int | None = None,
        wait_s: float | None = None,
    ) -> Any:
        """The first column of the first row of `query` (None when there is no row).

        `query` is one statement with `%s` placeholders. It may run `timeout_ms` milliseconds on the server
        (the pool's statement timeout by default) and gets ANSWER_MARGIN_S more to answer; it waits at most
        `wait_s` seconds for a pooled connection (the pool's timeout by default). An idempotent call
        is tried once more when its connection was lost, after the pool dropped its other dead connections:
        that hides connections the server closed while they sat in the pool. Other calls may have committed
        before the reply was lost, so they reach the caller as ConnectionClosed at once.
        """
        rows = self._fetch(query, params, tuple_row, idempotent, timeout_ms, wait_s)
        return rows[0][0] if rows else None

    def rows(
        self, query: str, params: Sequence[Any], *, idempotent: bool, timeout_ms: int | None = None
    ) -> list[dict[str, Any]]:
        """Every row of `query` as a dict; bounded and retried like `value`."""
        rows: list[dict[str, Any]] = self._fetch(query, params, dict_row, idempotent, timeout_ms, None)
        return rows

    def _fetch(
        self,
        query: str,
        params: Sequence[Any],
        row_factory: RowFactory[Any],
        idempotent: bool,
        timeout_ms: int | None,
        wait_s: float | None,
    ) -> Any:
        timeout_ms = int(timeout_ms if timeout_ms is not None else self.statement_timeout_ms)
        # SET LOCAL lives as long as the implicit transaction of this one query string, whatever pooler
        # carries it; the value is an int of ours, never a caller's string.
        bounded = f"set local statement_timeout = {timeout_ms}; {query}"
        answer_s = timeout_ms / 1000 + ANSWER_MARGIN_S
        if not self._opened:
            # Outside the retry: whatever stops the pool from opening (such as the session probe finding no
            # server connection) has already had its own deadline.
            self._open()
        attempts = 2 if idempotent else 1
        for attempt in range(1, attempts + 1):
            try:
                # The repeat runs on a connection known to be alive: a server that is dropping its sessions
                # (pg_terminate_backend, a restart) answers a pooled connection's check before it goes.
                with self._cursor(row_factory, answer_s, wait_s, verified=attempt > 1) as cur:
                    cur.execute(bounded, params)
                    cur.nextset()  # past the SET's empty result, to the call's rows
                    return cur.fetchall()
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
