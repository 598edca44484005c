"""Client-side deadlines for database calls: a call that gets no answer in time has its connection cut.

A server-side statement timeout bounds a statement once it runs. It cannot bound the time before that: a
pooler whose server connections are all taken keeps the client waiting (PgBouncer up to `query_wait_timeout`,
120 s by default; Supavisor up to its checkout timeout), and a network that silently dropped the connection
keeps it waiting for TCP to give up. psycopg has no timeout of its own for a call, so one watcher thread per
owner cuts the socket of a call that overran its deadline (`shutdown()`, which wakes the waiting thread with a
lost connection); the caller then reports why, and the pool drops the connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg


class Watch:
    """One watched call; `overran` tells, once the call returned or failed, whether its connection was cut."""

    __slots__ = ("conn", "deadline", "overran", "timeout_s")

    def __init__(self, conn: psycopg.Connection[Any], timeout_s: float) -> None:
        self.conn = conn
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.overran = False


class Deadlines:
    """Watches calls on connections and cuts the connection of any call still running at its deadline."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._watched: dict[int, Watch] = {}
        self._thread: threading.Thread | None = None
        #: When the watcher thread wakes next (monotonic seconds); a sooner deadline wakes it early.
        self._wake_at = float("inf")

    @contextlib.contextmanager
    def watch(self, conn: psycopg.Connection[Any], timeout_s: float) -> Iterator[Watch]:
        """Bound what runs inside to `timeout_s` seconds; a cut connection is closed on the way out."""
        watch = Watch(conn, timeout_s)
        with self._cond:
            self._ensure_thread()
            self._watched[id(watch)] = watch
            if watch.deadline < self._wake_at:
                self._cond.notify()
        try:
            yield watch
        finally:
            with self._cond:
                self._watched.pop(id(watch), None)
            if watch.overran:
                # The call may have finished just before the cut: the connection is unusable either way.
                conn.close()

    def _ensure_thread(self) -> None:
        # Started on first use, in the process that uses it: nothing is carried across a fork.
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-deadlines", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._watched:
                    self._wake_at = float("inf")
                    self._cond.wait()
                    continue
                now = time.monotonic()
                for watch in [w for w in self._watched.values() if w.deadline <= now]:
                    # Cut under the lock: the caller cannot be between "returned" and "forgotten" meanwhile.
                    watch.overran = True
                    del self._watched[id(watch)]
                    _cut(watch.conn)
                if self._watched:
                    self._wake_at = min(w.deadline for w in self._watched.values())
                    self._cond.wait(max(self._wake_at - time.monotonic(), 0.0))


def _cut(conn: psycopg.Connection[Any]) -> None:
    """Shut the connection's socket down, which wakes whoever waits on it; the fd stays psycopg's to close."""
    try:
        fd = conn.fileno()
    except psycopg.Error:
        return  # already closed
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)
