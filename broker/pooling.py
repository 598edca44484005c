"""A session of our own, or a transaction pooler's borrowed one? Found out leaving nothing behind.

Behind a transaction-mode pooler (Supavisor on port 6543, PgBouncer with `pool_mode = transaction`) each
transaction of a client connection runs on whichever server connection is free, shared with other clients.
Session-level state then lands on a connection someone else gets next and is lost to us: server-side prepared
statements, `SET`, `LISTEN`, session advisory locks. A direct connection or a session-mode pooler gives every
client connection a server session of its own for as long as it stays connected.

`detect_session_semantics` tells the two apart through the URL itself, with two short-lived connections:

1. A reads its server's process id; its transaction ends, and a transaction pooler takes the server back.
2. B opens a transaction and reads its server's process id. A transaction pooler hands B an idle server
   connection, and PgBouncer's default (LIFO) is the one it took back last: A's.
3. While B's transaction holds that server, A reads its server's process id again.

B on A's server, or A on a new one, proves a transaction pooler (two client connections shared one server
session, or one client connection changed sessions). Neither proves a session of our own: a pooler that hands
out servers round-robin could pass by chance. So A then LISTENs on a channel of its own, B rings it, and the
notification must reach A within the deadline: behind a transaction pooler it goes to a server connection A no
longer holds. Reads, a rolled-back transaction and (once the pid test passed) a LISTEN on a one-off channel
that A unlistens before closing: nothing stays on a pooled connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from broker.deadlines import Deadlines
from broker.errors import ConnectionClosed

#: Seconds the whole detection may take (two connections, a handful of reads and the LISTEN round trip).
DETECT_TIMEOUT_S = 8.0
#: Seconds a self-rung notification may take to arrive before LISTEN counts as not delivered.
LISTEN_PROBE_TIMEOUT_S = 2.0
#: Application name of the probe's connections in pg_stat_activity.
PROBE_APPLICATION_NAME = "queue-worker-probe"
#: Prefix of the one-off channel a probe listens on; the rest is random.
PROBE_CHANNEL_PREFIX = "queue_probe_"


@dataclasses.dataclass(frozen=True, slots=True)
class SessionSemantics:
    """What a connection URL gives: a session of our own (state may live on it), or a borrowed one."""

    #: True on a direct connection or through a session-mode pooler: prepared statements, LISTEN and session
    #: advisory locks work. False behind a transaction pooler (or when told so by DATABASE_POLL_ONLY).
    session_state: bool
    #: Why, in one sentence for the operator.
    reason: str


def poll_only() -> SessionSemantics:
    """What DATABASE_POLL_ONLY=true asks for: behave as behind a transaction pooler, without looking."""
    return SessionSemantics(False, "DATABASE_POLL_ONLY is set: behaving as behind a transaction pooler")


def detect_session_semantics(
    url: str,
    *,
    timeout_s: float = DETECT_TIMEOUT_S,
    listen_timeout_s: float = LISTEN_PROBE_TIMEOUT_S,
) -> SessionSemantics:
    """Whether `url` gives session semantics; raises ConnectionClosed when it cannot tell in `timeout_s`.

    A database (or pooler) that accepts connections but runs nothing within the deadline, such as a
    session-mode pooler whose every server connection is taken, raises ConnectionClosed saying so, rather
    than leaving the caller waiting for the pooler's own timeout.
    """
    deadline = time.monotonic() + timeout_s
    deadlines = Deadlines("session-probe")
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(_probe_connection(url, deadline))
        b = stack.enter_context(_probe_connection(url, deadline))
        watch_a = stack.enter_context(deadlines.watch(a, _left(deadline)))
        watch_b = stack.enter_context(deadlines.watch(b, _left(deadline)))
        try:
            verdict = _pid_test(a, b)
            if verdict is None:
                verdict = _listen_test(a, b, listen_timeout_s)
        except psycopg.OperationalError as exc:
            if watch_a.overran or watch_b.overran:
                raise ConnectionClosed(
                    f"the database accepted connections but answered nothing within {timeout_s:g} s: "
                    "a pooler whose server connections are all taken?"
                ) from None
            raise ConnectionClosed(exc) from None
        except psycopg.Error as exc:
            raise ConnectionClosed(exc) from None
    return verdict


def listen_delivers(
    conn: psycopg.Connection[Any],
    ring: Callable[[str, str], None],
    *,
    timeout_s: float = LISTEN_PROBE_TIMEOUT_S,
) -> bool:
    """Does a notification rung from elsewhere reach `conn` within `timeout_s`? For a LISTEN connection.

    `conn` (autocommit, idle) listens on a one-off channel; `ring(channel, payload)` must notify it from
    another connection (see `ring_from`). The one-off channel is unlistened again before returning; whatever
    else `conn` listens on is left alone. Call it after each (re)subscribe of a doorbell.
    """
    channel = f"{PROBE_CHANNEL_PREFIX}{secrets.token_hex(8)}"
    payload = secrets.token_hex(8)
    conn.execute(f"listen {channel}")
    try:
        ring(channel, payload)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            for note in conn.notifies(timeout=left, stop_after=1):
                if note.channel == channel and note.payload == payload:
                    return True
        return False
    finally:
        conn.execute(f"unlisten {channel}")


def ring_from(url: str, *, connect_timeout_s: float = LISTEN_PROBE_TIMEOUT_S) -> Callable[[str, str], None]:
    """A `ring` for `listen_delivers`: one pg_notify from a fresh connection to `url`."""

    def ring(channel: str, payload: str) -> None:
        with psycopg.connect(
            url,
            autocommit=True,
            prepare_threshold=None,
            application_name=PROBE_APPLICATION_NAME,
            connect_timeout=max(1, round(connect_timeout_s)),
        ) as conn:
            conn.execute("select pg_notify(%s, %s)", (channel, payload))

    return ring


class CachedSemantics:
    """Detects once per process, on first use, and remembers; thread-safe."""

    def __init__(self, detect: Callable[[], SessionSemantics]) -> None:
        self._detect = detect
        self._lock = threading.Lock()
        self._found: SessionSemantics | None = None

    def get(self) -> SessionSemantics:
        with self._lock:
            if self._found is None:
                self._found = self._detect()
            return self._found


# -- the tests ------------------------------------------------------------------------------------------
def _pid_test(a: psycopg.Connection[Any], b: psycopg.Connection[Any]) -> SessionSemantics | None:
    first = _backend_pid(a)
    with b.transaction(force_rollback=True):
        held_by_b = _backend_pid(b)
        second = _backend_pid(a)
    if held_by_b == first:
        return SessionSemantics(
            False, "a transaction pooler: two client connections were served by the same server session"
        )
    if second != first:
        return SessionSemantics(
            False, "a transaction pooler: one client connection moved to another server session"
        )
    return None


def _listen_test(
    a: psycopg.Connection[Any], b: psycopg.Connection[Any], timeout_s: float
) -> SessionSemantics:
    def ring(channel: str, payload: str) -> None:
        b.execute("select pg_notify(%s, %s)", (channel, payload))

    if listen_delivers(a, ring, timeout_s=timeout_s):
        return SessionSemantics(
            True, "each client connection keeps a server session of its own, and LISTEN delivers"
        )
    return SessionSemantics(
        False, f"a notification rung from another connection did not arrive within {timeout_s:g} s"
    )


def _backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


@contextlib.contextmanager
def _probe_connection(url: str, deadline: float) -> Any:
    left = _left(deadline)
    if left <= 0:
        raise ConnectionClosed("no time left to open a probe connection")
    try:
        conn = psycopg.connect(
            url,
            autocommit=True,
            prepare_threshold=None,
            application_name=PROBE_APPLICATION_NAME,
            connect_timeout=max(1, round(left)),
        )
    except psycopg.Error as exc:
        raise ConnectionClosed(exc) from None
    try:
        yield conn
    finally:
        conn.close()


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)
