"""Periodic jobs (issue 11): cron schedules enqueue exactly one job per tick, however many schedulers run."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime
from typing import Any

import dramatiq

from broker.broker import SupabaseBroker
from broker.operator_records import TICK_OPTION
from tests.support.brokers import BrokerFactory, Db, running_worker, wait_until
from worker.periodic import Periodic, Scheduler
from worker.schedules import Schedule

#: Schedulers enqueueing the same schedule at once, as worker processes of several containers would.
SCHEDULERS = 4
#: Seconds they run: a few ticks of an every-second schedule.
RUN_S = 3.2


def declare_reporter(broker: SupabaseBroker) -> dramatiq.Actor[Any, Any]:
    @dramatiq.actor(broker=broker, queue_name="periodic", actor_name="report")
    def report(kind: str) -> None: ...

    return report


def test_every_tick_is_enqueued_exactly_once_by_several_schedulers(
    db: Db, make_broker: BrokerFactory
) -> None:
    # Given four schedulers, each with its own broker and connections, on an every-second schedule
    schedule = Schedule("* * * * * *", args=("usage",))
    schedulers = []
    for _ in range(SCHEDULERS):
        broker = make_broker()
        schedulers.append(Scheduler(broker, [(declare_reporter(broker), schedule)]))

    # When they all run for a few seconds
    started = datetime.now(UTC)
    for scheduler in schedulers:
        scheduler.start()
    time.sleep(RUN_S)
    for scheduler in schedulers:
        scheduler.stop()

    # Then each tick has one job, and no tick was missed
    rows = db.execute(
        "select options ->> %s as tick, count(*) as jobs from public.coding_jobs group by 1 order by 1",
        (TICK_OPTION,),
    ).fetchall()
    ticks = [datetime.fromisoformat(row["tick"]) for row in rows]
    assert all(row["jobs"] == 1 for row in rows), rows
    assert len(ticks) >= int(RUN_S) and ticks[0] <= started.replace(microsecond=0), ticks
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(ticks)] == [1.0] * (len(ticks) - 1)


def test_a_tick_missed_beyond_the_grace_is_skipped_and_one_within_it_runs_late(
    db: Db, make_broker: BrokerFactory
) -> None:
    broker = make_broker()
    hourly = Schedule("0 * * * *")
    scheduler = Scheduler(broker, [(declare_reporter(broker), hourly)], misfire_grace_s=60)

    scheduler.run_once(datetime(2026, 12, 1, 10, 5, tzinfo=UTC))  # 5 minutes late: skipped
    scheduler.run_once(datetime(2026, 12, 1, 11, 0, 30, tzinfo=UTC))  # 30 s late: enqueued
    scheduler.run_once(datetime(2026, 12, 1, 11, 0, 45, tzinfo=UTC))  # the same tick again: nothing new

    rows = db.execute("select options ->> %s as tick from public.coding_jobs", (TICK_OPTION,)).fetchall()
    assert [row["tick"] for row in rows] == ["2026-12-01T11:00:00+00:00"]


def test_a_worker_runs_its_periodic_actors(make_broker: BrokerFactory) -> None:
    # Given an actor declared with a schedule on a broker with the Periodic middleware
    broker = make_broker()
    broker.add_middleware(Periodic())
    ran: list[str] = []
    done = threading.Event()

    @dramatiq.actor(broker=broker, periodic="* * * * * *")
    def tick() -> None:
        message = dramatiq.middleware.CurrentMessage.get_current_message()
        assert message is not None
        ran.append(message.options[TICK_OPTION])
        if len(ran) >= 2:
            done.set()

    # When a worker runs
    with running_worker(broker, threads=1):
        wait_until(done.is_set, timeout_s=10, describe="two ticks of the every-second actor to run")

    # Then each run came from its own tick
    assert len(set(ran)) == len(ran) >= 2
