"""Readiness: does the queue's database answer within the timeout?"""

from __future__ import annotations

import dataclasses
import threading
import time

from loguru import logger

from broker.transport import Transport
from health.background_call import BackgroundCall


@dataclasses.dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    #: Why the service is not ready; never the driver's message, which may name hosts and users.
    reason: str | None
    #: How long the answer took, in milliseconds.
    latency_ms: float


class ReadinessProbe:
    """Pings the database with a hard deadline; concurrent probes share the ping in flight."""

    def __init__(self, transport: Transport, timeout_ms: int) -> None:
        self.transport = transport
        self.timeout_s = timeout_ms / 1000
        self._lock = threading.Lock()
        self._ping: BackgroundCall[None] | None = None

    def _ping_now(self) -> None:
        self.transport.ping(self.timeout_s)

    def check(self) -> Readiness:
        started = time.monotonic()
        with self._lock:
            if self._ping is None or self._ping.done.is_set():
                self._ping = BackgroundCall(self._ping_now, "readiness-ping")
            ping = self._ping
        answered = ping.wait(self.timeout_s)
        latency_ms = round((time.monotonic() - started) * 1000, 1)
        if not answered:
            reason = f"the queue's database did not answer within {self.timeout_s * 1000:.0f} ms"
            logger.bind(event="readiness").warning("Not ready: {}", reason)
            return Readiness(ready=False, reason=reason, latency_ms=latency_ms)
        if ping.error is not None:
            reason = f"the queue's database is unreachable ({type(ping.error).__name__})"
            logger.bind(event="readiness").warning("Not ready: {}: {}", reason, ping.error)
            return Readiness(ready=False, reason=reason, latency_ms=latency_ms)
        return Readiness(ready=True, reason=None, latency_ms=latency_ms)
