"""Supervised background threads: restarted when they fail, and watched by /health when they stop ticking.

The broker's background work (the heartbeat, the watchdog, the ack flusher, the LISTEN connection) runs in
daemon threads. An unexpected exception must not end one silently: the supervisor logs it with its traceback
and runs the thread's loop again after a backoff. Each loop ticks as it goes round, and the worker's heartbeat
file carries every thread's last tick, so a thread that is wedged (or keeps failing) turns /health unhealthy,
naming it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from dramatiq.logging import get_logger

#: Seconds before each restart of a failed loop: one failure is retried quickly, a failing loop backs off.
RESTART_BACKOFF_S = (0.1, 1.0, 2.0, 5.0, 10.0)
#: A loop that ran this long without failing starts its backoff over.
HEALTHY_RUN_S = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class ThreadStatus:
    """One background thread as the heartbeat file reports it."""

    name: str
    alive: bool
    #: Epoch seconds of the loop's last tick.
    last_tick: float
    #: Seconds without a tick after which the thread counts as wedged; None: it may wait for work forever.
    stale_after_s: float | None
    restarts: int
    last_error: str | None


class SupervisedThread:
    """Runs `loop` on a daemon thread until `stopping` is set; a loop that raises or returns runs again."""

    def __init__(
        self,
        name: str,
        loop: Callable[[], None],
        *,
        stopping: threading.Event,
        stale_after_s: float | None = None,
    ) -> None:
        self.logger = get_logger(__name__, f"SupervisedThread({name})")
        self.name = name
        self.loop = loop
        self.stopping = stopping
        self.stale_after_s = stale_after_s
        self.last_tick = time.time()
        self.restarts = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._supervise, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def tick(self) -> None:
        """Called by the loop each time round: the sign of life /health looks at."""
        self.last_tick = time.time()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def status(self) -> ThreadStatus:
        return ThreadStatus(
            name=self.name,
            alive=self.is_alive(),
            last_tick=self.last_tick,
            stale_after_s=self.stale_after_s,
            restarts=self.restarts,
            last_error=self.last_error,
        )

    def _supervise(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            self.tick()
            try:
                self.loop()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.logger.exception("Background thread %s failed; restarting it.", self.name)
            else:
                if self.stopping.is_set():
                    return
                self.last_error = "its loop returned before the broker stopped"
                self.logger.error("Background thread %s ended unexpectedly; restarting it.", self.name)
            if time.monotonic() - started >= HEALTHY_RUN_S:
                failures = 0
            self.restarts += 1
            self.stopping.wait(RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)])
            failures += 1
