"""The worker's own connection to PostgreSQL: LISTEN for the doorbell, and the lock that says it lives.

One connection per worker process, held for its whole life (direct or session-pooled connections only):
- it LISTENs on the queue's channel and rings the consumers for each notification, and passes on each
  cancellation (`{"cancel": <job id>}`) so the job's holder stops it at once;
- it registers the worker with `register_worker(..., 'lock', ...)`, which takes a session advisory lock on
  this very session. PostgreSQL drops the lock the moment the session ends (the process was killed, the
  connection dropped), and that is how other workers know to rescue this worker's jobs within seconds;
- it is probed: every DOORBELL_PROBE_EVERY_S without traffic the doorbell is rung from another connection
  (the transport's pool) and must be heard here within DOORBELL_PROBE_TIMEOUT_S, so a connection that died
  silently (a vanished NAT entry or host: no FIN, no reset) is noticed, logged and replaced; TCP keepalives
  on both ends bound how long a vanished peer can look alive to the server.
A lost connection is reconnected at once (then with a short backoff), and its PresenceListener is told, so
the broker can stop running jobs it may no longer hold before other workers' grace period runs out.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from dramatiq.logging import get_logger

from broker.supervision import SupervisedThread, ThreadStatus
from broker.transport import (
    CancelCallback,
    Doorbell,
    PresenceListener,
    PresencePolicy,
    RingCallback,
    WorkerInfo,
    ring_due_at_ms,
)

#: The channel the queue's triggers notify on.
NOTIFY_CHANNEL = "coding_jobs"
#: Application name shown in pg_stat_activity, so operators can tell worker connections apart.
APPLICATION_NAME = "queue-worker"
#: Seconds the thread waits for a notification before looking at its other duties.
LISTEN_WAKE_S = 0.25
#: Seconds between reconnect attempts: at once, then doubling up to the maximum.
RECONNECT_BACKOFF_S = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
#: Seconds without any notification after which the connection rings itself to prove it still hears.
DOORBELL_PROBE_EVERY_S = 5.0
#: Seconds a probe may take to come back before the connection counts as dead.
DOORBELL_PROBE_TIMEOUT_S = 3.0
#: Failed connects between two warnings about them.
FAILURES_PER_WARNING = 15
#: Seconds a connect may take.
LISTEN_CONNECT_TIMEOUT_S = 5
#: libpq's client-side keepalives (connection parameters), and the server's for this session: a silent peer
#: is dead after about 16 s.
KEEPALIVE = "keepalives=1 keepalives_idle=10 keepalives_interval=2 keepalives_count=3"
_SERVER_KEEPALIVE_SQL = (
    "select set_config('tcp_keepalives_idle', '10', false),"
    " set_config('tcp_keepalives_interval', '2', false),"
    " set_config('tcp_keepalives_count', '3', false)"
)


class ConnectionSilent(Exception):
    """Raised when the connection did not hear its own probe in time."""


class ListenDoorbell(Doorbell):
    """A supervised thread holding the worker's LISTEN connection (and its presence lock, given a worker)."""

    def __init__(
        self,
        url: str,
        *,
        worker: WorkerInfo | None = None,
        presence: PresenceListener | None = None,
        policy: PresencePolicy | None = None,
        probe: Callable[[str], None] | None = None,
        probe_every_s: float = DOORBELL_PROBE_EVERY_S,
        probe_timeout_s: float = DOORBELL_PROBE_TIMEOUT_S,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.url = url
        #: Rings the doorbell with a probe token from another connection; None: no probing.
        self.probe = probe
        self.probe_every_s = probe_every_s
        self.probe_timeout_s = probe_timeout_s
        self.worker = worker
        self.presence = presence
        self.policy = policy
        self._stopping = threading.Event()
        self._reregister = threading.Event()
        self._thread: SupervisedThread | None = None
        self._ring: RingCallback | None = None
        self._cancel: CancelCallback | None = None
        self._probe: tuple[str, float] | None = None  # (token, monotonic time sent)
        self._heard_at = 0.0
        self._connected_once = False
        self._started = False
        self._up = False

    def start(self, ring: RingCallback, cancel: CancelCallback | None = None) -> None:
        self._ring = ring
        self._cancel = cancel
        self._thread = SupervisedThread(
            "queue-listen", self._run, stopping=self._stopping, stale_after_s=self.probe_every_s + 30.0
        )
        self._thread.start()
        self._started = True

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def reregister(self) -> None:
        self._reregister.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> ThreadStatus | None:
        # Not before it started: a heartbeat file written in between would call it dead.
        return self._thread.status() if self._thread is not None and self._started else None

    # -- the thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            assert self._thread is not None
            self._thread.tick()  # reconnecting is alive too: a database outage must not fail liveness
            try:
                with self._connect() as conn:
                    attempt = 0
                    self._serve(conn)
            except (psycopg.Error, ConnectionSilent) as exc:
                reason = f"{type(exc).__name__}: {str(exc).strip() or 'no detail'}"
                if not self._up and attempt % FAILURES_PER_WARNING == 0:
                    self.logger.warning("Cannot open the LISTEN connection (%s); trying again.", reason)
                self._went_down(reason)
                delay = RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)]
                attempt += 1
                self._stopping.wait(delay)
        self._went_down("stopped")

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            psycopg.conninfo.make_conninfo(self.url, **_keepalives()),
            autocommit=True,
            application_name=f"{APPLICATION_NAME}-listen",
            connect_timeout=LISTEN_CONNECT_TIMEOUT_S,
            prepare_threshold=None,
        )
        try:
            conn.execute(_SERVER_KEEPALIVE_SQL)
            if self.worker is not None:
                self._register(conn)
            conn.execute(f"listen {NOTIFY_CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _register(self, conn: psycopg.Connection[Any]) -> None:
        worker, policy = self.worker, self.policy
        assert worker is not None and policy is not None
        conn.execute(
            "select public.register_worker(%s, 'lock', %s, %s, %s, %s, %s)",
            (
                worker.worker_id,
                policy.stale_after_ms,
                worker.hostname,
                worker.pid,
                list(worker.queues),
                worker.concurrency,
            ),
        )
        self._reregister.clear()

    def _serve(self, conn: psycopg.Connection[Any]) -> None:
        if self._connected_once:
            self.logger.info("LISTEN connection re-established; looking for jobs that arrived meanwhile.")
        self._connected_once = True
        self._up = True
        if self.presence is not None and self.worker is not None:
            self.presence.session_up()
        self._heard_at = time.monotonic()
        self._probe = None
        self._ring_safely(None, 0)  # notifications sent while we were away are lost: look once
        while not self._stopping.is_set():
            assert self._thread is not None
            self._thread.tick()
            for note in conn.notifies(timeout=LISTEN_WAKE_S):
                self._heard(note.payload)
            if self._reregister.is_set() and self.worker is not None:
                self.logger.warning("The registry dropped this worker; registering it again.")
                self._register(conn)
                if self.presence is not None:
                    self.presence.session_up()
            self._check_probe()

    def _heard(self, payload: str) -> None:
        self._heard_at = time.monotonic()
        try:
            data = json.loads(payload)
        except ValueError:
            data = None
        if isinstance(data, dict) and "probe" in data:
            if self._probe is not None and data["probe"] == self._probe[0]:
                self._probe = None
            return
        if isinstance(data, dict) and "cancel" in data:
            if self._cancel is not None:
                try:
                    self._cancel(str(data["cancel"]))
                except Exception:
                    self.logger.exception("Doorbell cancel callback failed")
            return
        queue, run_at = _parse_ring(data)
        self._ring_safely(queue, run_at)

    def _check_probe(self) -> None:
        if self.probe is None:
            return
        now = time.monotonic()
        if self._probe is not None:
            if now - self._probe[1] > self.probe_timeout_s:
                raise ConnectionSilent(
                    f"did not hear a probe of the doorbell within {self.probe_timeout_s:g} s"
                )
        elif now - self._heard_at >= self.probe_every_s:
            token = uuid.uuid4().hex
            try:
                self.probe(token)
            except Exception as exc:
                # The other connection failed, not this one: try again next round.
                self.logger.debug("Could not ring a probe of the doorbell: %s", exc)
                self._heard_at = now
                return
            self._probe = (token, time.monotonic())

    def _went_down(self, reason: str) -> None:
        if not self._up:
            return
        self._up = False
        if reason == "stopped":
            return  # the broker is closing: its jobs are settled or handed back already
        self.logger.warning("LISTEN connection lost (%s); reconnecting.", reason)
        if self.presence is not None and self.worker is not None:
            self.presence.session_down(reason)

    def _ring_safely(self, queue: str | None, run_at_ms: int) -> None:
        if self._ring is None:
            return
        try:
            self._ring(queue, run_at_ms)
        except Exception:
            self.logger.exception("Doorbell ring callback failed")


def _keepalives() -> dict[str, str]:
    return dict(part.split("=", 1) for part in KEEPALIVE.split())


def _parse_ring(data: Any) -> tuple[str | None, int]:
    try:
        return str(data["queue"]), ring_due_at_ms(data)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None, 0
