"""The keeper: the worker's heartbeat to the queue, and the watchdog that stops jobs it may no longer hold.

Two supervised threads:
- the heartbeat (every PresencePolicy.heartbeat_interval_s) registers the worker when its presence is by
  heartbeat, calls `worker_heartbeat` with the claims it holds (extending their leases every third of the
  lease), learns which of them it no longer holds, and runs the rescue of dead workers' jobs, which makes a
  dead worker's jobs claimable within seconds. A rescue that moved jobs wakes the consumers.
- the watchdog (every WATCHDOG_TICK_S, no I/O) stops the jobs this worker can no longer be sure it holds: all
  of them when its presence lapsed (the session that holds its lock dropped and did not come back in time, or
  its heartbeats stopped getting through), and any one whose lease may have run out (the process was frozen).
  It also enforces the shutdown deadline, and stops cancelled jobs that did not stop by themselves. Stopping
  a job raises an exception in its thread, as Dramatiq's TimeLimit does; its late settle is fenced by its
  claim token anyway.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

from dramatiq.logging import get_logger

from broker.cancels import Cancellations
from broker.errors import ConnectionClosed, QueueError
from broker.holdings import Holdings
from broker.interrupts import ShutdownDeadline
from broker.messages import JobProxy
from broker.presence import PresenceState
from broker.settle import Settler
from broker.supervision import SupervisedThread, ThreadStatus
from broker.transport import Doorbell, Transport, WorkerInfo

#: Seconds between the watchdog's checks.
WATCHDOG_TICK_S = 0.1
#: Fraction of the lease between extensions: three tries before a lease can run out.
EXTEND_EVERY_FRACTION = 1 / 3
#: Fraction of the lease a holder trusts after an extension was sent: it stops the job before the lease ends.
LEASE_TRUST_FRACTION = 0.8
#: Heartbeats a stale-tick check allows before it calls the heartbeat thread wedged.
STALE_HEARTBEATS = 10


class Keeper:
    """The heartbeat and the watchdog of one worker process."""

    def __init__(
        self,
        transport: Transport,
        *,
        worker: Callable[[], WorkerInfo],
        holdings: Holdings,
        settler: Settler,
        presence: PresenceState,
        lease_ms: int,
        max_rescues: int,
        doorbell: Callable[[], Doorbell | None],
        cancellations: Cancellations,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.transport = transport
        self.worker = worker
        self.holdings = holdings
        self.settler = settler
        self.presence = presence
        self.policy = presence.policy
        self.lease_ms = lease_ms
        self.max_rescues = max_rescues
        self.doorbell = doorbell
        self.cancellations = cancellations
        #: Monotonic deadline after which running jobs are interrupted and handed back; None until shutdown.
        self.shutdown_deadline: float | None = None
        #: Claims of jobs stopped because presence lapsed: handed back once the worker is registered again.
        self._dropped: list[JobProxy] = []
        self._next_extend = 0.0
        self._stopping = threading.Event()
        interval = self.policy.heartbeat_interval_s
        self._heartbeat = SupervisedThread(
            "queue-heartbeat",
            self._heartbeat_loop,
            stopping=self._stopping,
            stale_after_s=max(interval * STALE_HEARTBEATS, 30.0),
        )
        self._watchdog = SupervisedThread(
            "queue-watchdog", self._watchdog_loop, stopping=self._stopping, stale_after_s=10.0
        )

    def start(self) -> None:
        self._heartbeat.start()
        self._watchdog.start()

    def stop(self) -> None:
        self._stopping.set()
        self._heartbeat.join(timeout=5)
        self._watchdog.join(timeout=1)

    def statuses(self) -> list[ThreadStatus]:
        return [self._heartbeat.status(), self._watchdog.status()]

    def trust_lease(self, proxies: Sequence[JobProxy], sent_at: float) -> None:
        """Their claim (or extension) was sent at monotonic `sent_at` and succeeded."""
        valid_until = sent_at + self.lease_ms / 1000 * LEASE_TRUST_FRACTION
        for proxy in proxies:
            proxy.lease_valid_until = valid_until

    # -- the heartbeat ------------------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        # Often enough for the presence policy, and for three extensions per lease however short it is.
        interval_s = min(self.policy.heartbeat_interval_s, self.lease_ms / 1000 * EXTEND_EVERY_FRACTION)
        while not self._stopping.is_set():
            self._heartbeat.tick()
            try:
                self.beat()
            except (ConnectionClosed, QueueError) as exc:
                self.logger.warning("Heartbeat failed: %s", exc)
            self._stopping.wait(interval_s)

    def beat(self) -> None:
        """One heartbeat: register if needed, extend leases when due, drop lost jobs, rescue dead workers'."""
        worker = self.worker()
        if self.policy.mode == "heartbeat" and not self.presence.registered:
            sent_at = time.monotonic()
            self.transport.register_worker(worker, self.policy)
            self.presence.confirmed(sent_at)
            self.logger.info("Registered worker %s (heartbeat presence).", worker.worker_id)
            self.holdings.notify_all()  # consumers waiting for the registration may claim now
        self._hand_back_dropped()
        proxies = [p for p in self.holdings.held() if not p.settled]
        now = time.monotonic()
        extend = now >= self._next_extend
        sent_at = now
        reply = self.transport.heartbeat(
            worker.worker_id,
            [p.claim for p in proxies],
            lease_ms=self.lease_ms if extend else None,
            queues=worker.queues,
            max_rescues=self.max_rescues,
        )
        if extend:
            self._next_extend = now + self.lease_ms / 1000 * EXTEND_EVERY_FRACTION
            self.trust_lease([p for p in proxies if p.claim.job_id in reply.held], sent_at)
        self._registration(reply.registered, sent_at)
        for proxy in proxies:
            if proxy.claim.job_id not in reply.held and not (proxy.settled or proxy.finishing):
                self.settler.lose(proxy, "the queue says this worker no longer holds it (rescued or taken)")
        for job_id in reply.cancel_requested:
            self.cancellations.request(job_id)  # the doorbell may have missed it: nothing is lost
        if reply.rescued:
            self.logger.warning("Rescued %d job(s) of dead workers or expired leases.", reply.rescued)
            self.holdings.notify_all()

    def _registration(self, registered: bool, sent_at: float) -> None:
        if self.policy.mode == "heartbeat":
            if registered:
                self.presence.confirmed(sent_at)
            elif self.presence.registered:
                self.logger.warning("The registry dropped this worker; registering it again.")
                self.presence.unregistered()
        elif not registered and self.presence.registered and self.presence.news_since(sent_at):
            self.presence.unregistered()
            doorbell = self.doorbell()
            if doorbell is not None:
                doorbell.reregister()

    def _hand_back_dropped(self) -> None:
        if not self._dropped or not self.presence.may_claim():
            return
        dropped, self._dropped = self._dropped, []
        try:
            released = self.transport.release([p.claim for p in dropped])
        except ConnectionClosed:
            self._dropped.extend(dropped)
            raise
        if released:
            self.logger.info("Handed back %d job(s) stopped while this worker's presence lapsed.", released)

    # -- the watchdog -------------------------------------------------------------------------------------
    def _watchdog_loop(self) -> None:
        while not self._stopping.wait(WATCHDOG_TICK_S):
            self._watchdog.tick()
            self.check()

    def check(self) -> None:
        """Stop what must stop now; no I/O, so it keeps its pace whatever the database does."""
        now = time.monotonic()
        held = [p for p in self.holdings.held() if not (p.settled or p.finishing)]
        if held and not self.presence.may_run():
            for proxy in held:
                self._dropped.append(proxy)
                self.settler.lose(proxy, "this worker's presence lapsed; other workers may rescue it")
            return
        for proxy in held:
            if now > proxy.lease_valid_until:
                self.settler.lose(proxy, "its lease may have run out (was this process frozen?)")
        self.cancellations.check(now)
        if self.shutdown_deadline is not None and now >= self.shutdown_deadline:
            self.interrupt_running_for_shutdown()

    def interrupt_running_for_shutdown(self) -> list[JobProxy]:
        """Stop the jobs still running at the shutdown deadline; they go back to the queue as they unwind."""
        interrupted = []
        for proxy in self.holdings.running():
            if proxy.interrupted is None and not proxy.settled:
                self.logger.warning(
                    "Job %s (%s) is still running at the shutdown deadline; stopping it and handing it back.",
                    proxy.claim.job_id,
                    proxy.actor_name,
                )
                self.holdings.interrupt(proxy, ShutdownDeadline)
                interrupted.append(proxy)
        return interrupted

    def start_shutdown(self, timeout_ms: int | None) -> None:
        """The worker began its graceful shutdown: jobs still running after `timeout_ms` will be stopped."""
        if timeout_ms is not None:
            self.shutdown_deadline = time.monotonic() + timeout_ms / 1000
        else:
            self.shutdown_deadline = math.inf
