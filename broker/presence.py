"""Whether this worker may still run the jobs it holds: its presence in the registry, seen from the inside.

Other workers rescue a worker's jobs once it counts as dead: for a lock worker, once its session advisory lock
has been gone for RESCUE_GRACE_MS; for a heartbeat worker, once its heartbeat is older than its stale window.
The worker itself must stop running those jobs before that can happen, or a job would run twice at once. So it
keeps a deadline on the same terms, measured from what it last knew for sure, with a margin: a lock worker
whose session dropped gives itself HOLDER_GRACE_S to take its lock again; a heartbeat worker trusts its last
successful heartbeat for most, not all, of its stale window (measured from when that heartbeat was sent).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from broker.transport import PresencePolicy

#: Milliseconds a lock worker's lock may be gone before other workers rescue its jobs (rescue_jobs' default).
RESCUE_GRACE_MS = 2_000
#: Seconds a lock worker whose session dropped keeps its jobs running while it reconnects: half the grace.
HOLDER_GRACE_S = RESCUE_GRACE_MS / 1000 / 2
#: Share of a heartbeat worker's stale window it leaves unused, as a margin for clocks and slow replies.
HEARTBEAT_MARGIN = 0.3


class PresenceState:
    """Thread-safe; fed by the doorbell (lock presence) or the heartbeat loop (heartbeat presence)."""

    def __init__(self, policy: PresencePolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._up = False
        self._down_since: float | None = None
        self._confirmed_at: float | None = None
        self._up_at: float | None = None

    # -- lock presence: the doorbell's session ------------------------------------------------------------
    def session_up(self) -> None:
        with self._lock:
            self._up = True
            self._down_since = None
            self._up_at = self._clock()

    def news_since(self, sent_at: float) -> bool:
        """Whether a reply to a request sent at monotonic `sent_at` is newer than the last session_up.

        A heartbeat sent before the doorbell registered this worker finds it unregistered: old news.
        """
        with self._lock:
            return self._up_at is None or sent_at >= self._up_at

    def session_down(self, reason: str) -> None:
        with self._lock:
            if self._up:
                self._up = False
                self._down_since = self._clock()

    # -- heartbeat presence -------------------------------------------------------------------------------
    def confirmed(self, sent_at: float) -> None:
        """A heartbeat sent at monotonic `sent_at` found this worker registered."""
        with self._lock:
            self._up = True
            if self._confirmed_at is None or sent_at > self._confirmed_at:
                self._confirmed_at = sent_at

    def unregistered(self) -> None:
        """The registry does not know this worker (declared dead): it holds nothing until it registers."""
        with self._lock:
            if self._up:
                self._up = False
                self._down_since = self._clock()
            self._confirmed_at = None

    # -- the verdicts -------------------------------------------------------------------------------------
    @property
    def registered(self) -> bool:
        with self._lock:
            return self._up

    def may_claim(self) -> bool:
        """Claims need a registration no one has doubts about."""
        with self._lock:
            return self._up and (self.policy.mode == "lock" or self._fresh())

    def may_run(self) -> bool:
        """Whether the jobs this worker holds are still surely its own."""
        with self._lock:
            if self.policy.mode == "lock":
                if self._up:
                    return True
                return self._down_since is not None and self._clock() < self._down_since + HOLDER_GRACE_S
            return self._fresh()

    def _fresh(self) -> bool:
        if self._confirmed_at is None:
            return False
        trusted_s = self.policy.stale_after_ms / 1000 * (1 - HEARTBEAT_MARGIN)
        return self._clock() < self._confirmed_at + trusted_s
