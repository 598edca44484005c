"""The doorbell without LISTEN: rings the consumers on a schedule, often after work, less often when idle.

Behind a transaction pooler LISTEN cannot work (a notification goes to whichever server connection the LISTEN
ran on, which another client now holds), so an idle worker would only find new jobs at its poll interval. This
doorbell rings every consumer of the process on its own schedule instead: every BUSY_RING_MS while jobs were
claimed within the last BUSY_WINDOW_MS (a burst usually brings more), then backing off by doubling to
IDLE_RING_MS. Each ring costs a consumer with room one claim (an index scan on pending rows, or nothing when
it is busy); bench/poll_pickup.py measures pickup latency and queries per second for these numbers.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from broker.supervision import SupervisedThread, ThreadStatus
from broker.transport import CancelCallback, Doorbell, RingCallback

#: Milliseconds between rings while jobs were claimed recently.
BUSY_RING_MS = 250
#: Milliseconds between rings of an idle worker: the idle pickup is about half of it (p50).
IDLE_RING_MS = 1_000
#: Milliseconds after the last claim that found jobs during which the worker counts as busy.
BUSY_WINDOW_MS = 10_000
#: Each interval is drawn within this fraction either side, so the processes of a fleet do not ring in step.
JITTER = 0.2
#: Seconds beyond the longest interval after which a silent polling thread counts as wedged.
STALE_MARGIN_S = 30.0


class PollPolicy:
    """The interval to the next ring, from how long ago work was last found."""

    def __init__(
        self,
        *,
        busy_ms: int = BUSY_RING_MS,
        idle_ms: int = IDLE_RING_MS,
        busy_window_ms: int = BUSY_WINDOW_MS,
        jitter: float = JITTER,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < busy_ms <= idle_ms:
            raise ValueError("need 0 < busy_ms <= idle_ms")
        self.busy_s = busy_ms / 1000
        self.idle_s = idle_ms / 1000
        self.busy_window_s = busy_window_ms / 1000
        self.jitter = jitter
        #: The longest interval a ring may wait, jitter included.
        self.max_interval_s = self.idle_s * (1 + jitter)
        self._rng = rng or random.Random()
        self._current_s = self.idle_s

    def next_interval_s(self, since_work_s: float | None) -> float:
        """Seconds to the next ring; `since_work_s` is how long ago a claim last found jobs (None: never)."""
        if since_work_s is not None and since_work_s < self.busy_window_s:
            self._current_s = self.busy_s
        else:
            # Back off by doubling, so the last jobs of a burst are still picked up fast.
            self._current_s = min(self._current_s * 2, self.idle_s)
        spread = self._current_s * self.jitter
        return self._current_s + self._rng.uniform(-spread, spread)


class PollingDoorbell(Doorbell):
    """A thread that rings every consumer (queue None) on the policy's schedule."""

    def __init__(self, last_work_at: Callable[[], float | None], policy: PollPolicy | None = None) -> None:
        #: Monotonic time of the last claim that found jobs, or None.
        self.last_work_at = last_work_at
        self.policy = policy or PollPolicy()
        self._stopping = threading.Event()
        self._thread: SupervisedThread | None = None

    def start(self, ring: RingCallback, cancel: CancelCallback | None = None) -> None:
        # Cancellations reach a poll-only worker through its heartbeat (worker_heartbeat's cancel_requested).
        thread = SupervisedThread(
            "queue-poll",
            lambda: self._run(ring),
            stopping=self._stopping,
            stale_after_s=self.policy.max_interval_s + STALE_MARGIN_S,
        )
        thread.start()
        self._thread = thread  # only once started: a heartbeat file written in between would call it dead

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> ThreadStatus | None:
        return None if self._thread is None else self._thread.status()

    def _run(self, ring: RingCallback) -> None:
        while True:
            if self._thread is not None:
                self._thread.tick()
            found_at = self.last_work_at()
            since = None if found_at is None else time.monotonic() - found_at
            if self._stopping.wait(self.policy.next_interval_s(since)):
                return
            ring(None, 0)
