"""Periodic jobs (Celery beat's job): actors declared with cron schedules are enqueued on every tick.

    @dramatiq.actor(periodic="*/5 * * * *")
    def refresh_usage() -> None: ...

    @dramatiq.actor(periodic=[Schedule("0 9 * * MON-FRI", args=("daily",), timezone="Europe/Paris")])
    def report(kind: str) -> None: ...

Every worker process runs a scheduler thread; there is no leader to elect and nothing to fail over. Each tick
is one job however many schedulers enqueue it: its message id is derived from (schedule, tick), and the queue
keeps the first insert of an id (worker/schedules.py). A tick missed while no worker ran is enqueued late when
a scheduler starts within MISFIRE_GRACE_S of it, and skipped after that (one job, not a burst of catch-ups).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import dramatiq
from dramatiq.logging import get_logger
from dramatiq.message import Message
from dramatiq.middleware import Middleware

from broker.operator_records import TICK_OPTION
from worker.schedules import PERIODIC_OPTION, Schedule, schedules_of

#: Seconds after a tick within which a scheduler that missed it (no worker was running) still enqueues it.
MISFIRE_GRACE_S = 60.0
#: Seconds a scheduler sleeps at most between looks at the clock (ticks far off, or the queue unreachable).
MAX_SLEEP_S = 30.0
#: Seconds to wait before trying again after an enqueue failed.
RETRY_AFTER_S = 1.0


class Scheduler:
    """Enqueues the due ticks of a set of (actor, schedule) entries from one background thread."""

    def __init__(
        self,
        broker: dramatiq.Broker,
        entries: list[tuple[dramatiq.Actor[Any, Any], Schedule]],
        *,
        misfire_grace_s: float = MISFIRE_GRACE_S,
    ) -> None:
        self.logger = get_logger(__name__, type(self))
        self.broker = broker
        self.entries = entries
        self.misfire_grace_s = misfire_grace_s
        #: The last tick enqueued (or found too late) per entry.
        self._done: list[datetime | None] = [None] * len(entries)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="periodic-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def run_once(self, now: datetime) -> float:
        """Enqueue every tick due at `now` not enqueued yet; returns the seconds until the next tick."""
        wait_s = MAX_SLEEP_S
        for index, (actor, schedule) in enumerate(self.entries):
            tick = schedule.last_tick(now)
            if tick is not None and tick != self._done[index]:
                late_s = (now - tick).total_seconds()
                if late_s <= self.misfire_grace_s:
                    self.enqueue(actor, schedule, tick)
                elif self._done[index] is not None:
                    self.logger.warning(
                        "Skipped the %s tick of %s (%s): it is %.0f s late.",
                        tick.isoformat(),
                        actor.actor_name,
                        schedule.cron,
                        late_s,
                    )
                self._done[index] = tick
            upcoming = schedule.next_tick(now)
            if upcoming is not None:
                wait_s = min(wait_s, max((upcoming - now).total_seconds(), 0.0))
        return wait_s

    def enqueue(self, actor: dramatiq.Actor[Any, Any], schedule: Schedule, tick: datetime) -> Message[Any]:
        """Enqueue the job of one tick (a repeat of the same tick by any scheduler changes nothing)."""
        message = actor.message_with_options(
            args=schedule.args, kwargs=dict(schedule.kwargs), **{TICK_OPTION: tick.isoformat()}
        )
        message = message.copy(message_id=schedule.message_id(actor.actor_name, tick))
        return self.broker.enqueue(message)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait_s = self.run_once(datetime.now(UTC))
            except Exception as exc:  # the queue unreachable: the tick stays due until the grace is over
                self.logger.warning("Periodic jobs could not be enqueued (%s); trying again.", exc)
                wait_s = RETRY_AFTER_S
            # Wake a little after the tick: cron times are whole seconds and clocks drift.
            self._stop.wait(min(wait_s, MAX_SLEEP_S) + 0.001)


class Periodic(Middleware):
    """Declares the `periodic` actor option and runs a Scheduler in each worker process."""

    actor_options = {PERIODIC_OPTION}  # noqa: RUF012 -- Dramatiq's Middleware declares it as a class attribute

    def __init__(self, *, misfire_grace_s: float = MISFIRE_GRACE_S) -> None:
        self.logger = get_logger(__name__, type(self))
        self.misfire_grace_s = misfire_grace_s
        self.scheduler: Scheduler | None = None

    def after_declare_actor(self, broker: dramatiq.Broker, actor: dramatiq.Actor[Any, Any]) -> None:
        schedules_of(actor.options)  # a bad schedule fails where it is declared, not in a worker later

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        entries = [
            (actor, schedule)
            for name in sorted(broker.get_declared_actors())
            for actor in [broker.get_actor(name)]
            for schedule in schedules_of(actor.options)
        ]
        if not entries:
            return
        self.scheduler = Scheduler(broker, entries, misfire_grace_s=self.misfire_grace_s)
        self.scheduler.start()
        self.logger.info("Periodic jobs: %s.", ", ".join(f"{a.actor_name} ({s.cron})" for a, s in entries))

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
