"""The lease keeper: extends the leases of the jobs this process holds, and rescues expired ones."""

from __future__ import annotations

import threading
from collections.abc import Callable

from dramatiq.logging import get_logger

from broker.errors import ConnectionClosed, QueueError
from broker.messages import JobProxy
from broker.transport import Transport

#: Fraction of the lease between extensions: three tries before a lease can run out.
EXTEND_EVERY_FRACTION = 1 / 3


class LeaseKeeper:
    """A daemon thread; a frozen or killed process stops extending, so its leases run out."""

    def __init__(
        self,
        transport: Transport,
        lease_ms: int,
        held: Callable[[], list[JobProxy]],
        on_lost: Callable[[JobProxy], None],
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.transport = transport
        self.lease_ms = lease_ms
        self.held = held
        self.on_lost = on_lost
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def extend_now(self) -> None:
        proxies = [p for p in self.held() if not p.settled]
        if not proxies:
            return
        still_held = self.transport.extend_leases([p.claim for p in proxies], self.lease_ms)
        for proxy in proxies:
            if proxy.claim.job_id not in still_held and not (proxy.settled or proxy.finishing):
                self.logger.warning(
                    "Lost the lease of job %s: it will not be acked by this worker.", proxy.claim.job_id
                )
                self.on_lost(proxy)

    def rescue_expired(self) -> None:
        """Every worker returns jobs whose holder died; SKIP LOCKED keeps them out of each other's way."""
        rescued = self.transport.requeue_expired_leases()
        if rescued:
            self.logger.warning("Returned %d job(s) whose lease expired to the queue.", rescued)

    def _run(self) -> None:
        interval_s = self.lease_ms / 1000 * EXTEND_EVERY_FRACTION
        while not self._stopping.wait(interval_s):
            for step in (self.extend_now, self.rescue_expired):
                try:
                    step()
                except (ConnectionClosed, QueueError) as exc:
                    self.logger.warning("Lease upkeep failed (%s): %s", step.__name__, exc)
