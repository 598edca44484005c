"""The direct PostgreSQL transport's own mechanics: killed connections, the LISTEN doorbell, poll-only mode.

Not parametrised over transports: these are about psycopg's pool and PostgreSQL's LISTEN.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from broker.broker import SupabaseBroker
from broker.postgres import APPLICATION_NAME, PostgresTransport
from tests.support.actors import declare_test_actors
from tests.support.brokers import (
    Db,
    Settlements,
    build_broker,
    insert_job,
    job,
    running_worker,
    wait_for_status,
    wait_until,
)

#: Milliseconds between polls of the workers that must be woken by the doorbell: far beyond every wait below.
IDLE_POLL_MS = 60_000
#: Seconds a doorbell may take to wake an idle worker and have a no-op job completed.
WAKE_TIMEOUT_S = 2.5
#: Delayed jobs sent one after the other in the due-time test.
DUE_WAKE_UPS = 10
#: Milliseconds of delay of each of them.
DUE_DELAY_MS = 100
#: Seconds the doorbell may take to reconnect (broker.postgres.LISTEN_RETRY_S is 1) and look again.
RECONNECT_TIMEOUT_S = 4
#: Seconds an idle worker is left alone so its start-up claims are done before a test inserts.
SETTLE_IDLE_S = 0.5
#: Seconds any other wait of these tests may take.
TIMEOUT_S = 10
#: Seconds from the end of a run to its row's completion when the pooled connections were killed: a retry on
#: a fresh connection, well before Dramatiq's own 5-second ack retry (POST_PROCESS_MESSAGE_RETRY_DELAY_SECS).
ACK_RECOVERY_S = 3
LISTEN_APPLICATION_NAME = f"{APPLICATION_NAME}-listen"

PgBrokerFactory = Callable[..., SupabaseBroker]


@pytest.fixture
def pg_broker(database_url: str) -> Iterator[PgBrokerFactory]:
    """Builds brokers over PostgresTransport on the test's database; closes them at teardown."""
    with ExitStack() as stack:

        def make(*, poll_only: bool = False, poll_interval_ms: int = IDLE_POLL_MS) -> SupabaseBroker:
            transport = PostgresTransport(database_url, pool_size=4, poll_only=poll_only)
            broker = build_broker(transport, poll_interval_ms=poll_interval_ms)
            stack.callback(broker.close)
            return broker

        yield make


def backends(db: Db, application_name: str) -> list[int]:
    """Pids of this database's backends with the given application name."""
    rows = db.execute(
        "select pid from pg_stat_activity where datname = current_database() and application_name = %s",
        (application_name,),
    ).fetchall()
    return [row["pid"] for row in rows]


def listening(db: Db) -> list[int]:
    """Pids of this database's doorbell connections that have run LISTEN."""
    rows = db.execute(
        "select pid from pg_stat_activity where datname = current_database() and application_name = %s"
        " and query ilike 'listen %%'",
        (LISTEN_APPLICATION_NAME,),
    ).fetchall()
    return [row["pid"] for row in rows]


def terminate(db: Db, application_name: str) -> int:
    """pg_terminate_backend every backend of this database with the given application name."""
    row = db.execute(
        "select count(*) filter (where pg_terminate_backend(pid)) as n from pg_stat_activity"
        " where datname = current_database() and application_name = %s",
        (application_name,),
    ).fetchone()
    assert row is not None
    return int(row["n"])


def test_an_ack_succeeds_after_its_pooled_connection_was_killed(pg_broker: PgBrokerFactory, db: Db) -> None:
    broker = pg_broker(poll_interval_ms=200)
    settlements = Settlements()
    broker.add_middleware(settlements)
    actors = declare_test_actors(broker)
    message = actors.slow.send("through a kill", 800)

    # One thread and no prefetch beyond it: nothing but the ack uses the pool after the kill
    with running_worker(broker, threads=1, prefetch=1):
        # Given a running job
        wait_until(lambda: actors.runs.of("slow", "started"), TIMEOUT_S, "the job to start")

        # When every pooled connection of the worker is terminated
        assert terminate(db, APPLICATION_NAME) >= 1

        # Then its ack succeeds on a fresh connection, promptly
        assert settlements.wait_settled(message.message_id, TIMEOUT_S) == "ack"
        row = wait_for_status(db, message.message_id, "completed", TIMEOUT_S)
        (finished,) = actors.runs.of("slow", "finished")
        assert time.monotonic() - finished.at < ACK_RECOVERY_S
        assert row["retry_count"] == 0

        # And the worker goes on working
        after = actors.record.send("after the kill")
        wait_for_status(db, after.message_id, "completed", TIMEOUT_S)

    assert len(actors.runs.of("slow", "started")) == 1


def test_the_doorbell_wakes_an_idle_worker_at_once(pg_broker: PgBrokerFactory, db: Db) -> None:
    broker = pg_broker()
    actors = declare_test_actors(broker)

    with running_worker(broker, threads=1):
        # Given an idle worker whose next poll is a minute away
        wait_until(lambda: listening(db), TIMEOUT_S, "the doorbell to LISTEN")
        time.sleep(SETTLE_IDLE_S)

        # When a row is inserted, then the notification gets it run
        job_id = insert_job(db, actor_name="record", args=["rung"])
        wait_for_status(db, job_id, "completed", WAKE_TIMEOUT_S)
    assert actors.runs.keys("record") == ["rung"]


def test_the_doorbell_wakes_an_idle_worker_when_a_delay_or_a_retry_falls_due(
    pg_broker: PgBrokerFactory, db: Db
) -> None:
    broker = pg_broker()
    actors = declare_test_actors(broker)

    with running_worker(broker, threads=1):
        wait_until(lambda: listening(db), TIMEOUT_S, "the doorbell to LISTEN")
        time.sleep(SETTLE_IDLE_S)

        # Delayed jobs, one after the other: each notification carries the run time, and the worker wakes then
        # (several, because a wake-up a hair before the database's run_at finds nothing due)
        for i in range(DUE_WAKE_UPS):
            sent_at = time.monotonic()
            delayed = actors.record.send_with_options(args=(f"delayed-{i}",), delay=DUE_DELAY_MS)
            wait_for_status(db, delayed.message_id, "completed", WAKE_TIMEOUT_S)
            assert actors.runs.of("record")[-1].at - sent_at >= DUE_DELAY_MS / 1000

        # A retry: retry_job rings with the job's next run time
        retried = actors.flaky.send("retried", 1)
        wait_for_status(db, retried.message_id, "completed", WAKE_TIMEOUT_S)
        assert job(db, retried.message_id)["retry_count"] == 1


def test_the_doorbell_reconnects_and_looks_for_what_it_missed(pg_broker: PgBrokerFactory, db: Db) -> None:
    broker = pg_broker()
    actors = declare_test_actors(broker)

    with running_worker(broker, threads=1):
        (first,) = wait_until(lambda: listening(db), TIMEOUT_S, "the doorbell to LISTEN")
        time.sleep(SETTLE_IDLE_S)

        # Given the LISTEN connection was killed, and a row inserted while it was gone
        assert terminate(db, LISTEN_APPLICATION_NAME) == 1
        job_id = insert_job(db, actor_name="record", args=["missed"])

        # Then the doorbell reconnects and rings once, so the row runs long before the next poll
        wait_for_status(db, job_id, "completed", RECONNECT_TIMEOUT_S)
        assert first not in listening(db)
    assert actors.runs.keys("record") == ["missed"]


def test_poll_only_mode_runs_jobs_without_listen(pg_broker: PgBrokerFactory, db: Db) -> None:
    broker = pg_broker(poll_only=True, poll_interval_ms=200)
    actors = declare_test_actors(broker)

    with running_worker(broker, threads=1):
        job_id = insert_job(db, actor_name="record", args=["polled"])
        wait_for_status(db, job_id, "completed", TIMEOUT_S)
        assert backends(db, LISTEN_APPLICATION_NAME) == []
        assert backends(db, APPLICATION_NAME) != []
    assert actors.runs.keys("record") == ["polled"]
