"""Behind a pooler (issue 12): a real PgBouncer in transaction and session mode stands in for Supavisor.

Nothing the queue does may leave state on a pooled server connection (prepared statements, settings, LISTEN,
advisory locks), whatever the pool mode and with no pooler setting; each check reads every server connection
the pooler keeps, through the pooler (tests/support/pgbouncer.py).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from broker.errors import ConnectionClosed
from broker.function_pool import FunctionPool
from broker.polling import PollingDoorbell
from broker.pooling import detect_session_semantics, listen_delivers, ring_from
from broker.postgres import HEARTBEAT_PRESENCE, PostgresTransport
from broker.transport import Claim, NewJob, WorkerInfo
from health.readiness import ReadinessProbe
from service.migrate import apply_migrations
from tests.support.actors import declare_test_actors
from tests.support.brokers import Db, build_broker, insert_job, running_worker, wait_for_status
from tests.support.databases import DatabaseServer
from tests.support.pgbouncer import (
    SESSION,
    TRANSACTION,
    PgBouncer,
    leftovers,
    pooled_sessions,
    running_pgbouncer,
)
from tests.support.processes import free_port

#: Rounds of calls in the prepared-statement test: psycopg prepares a query on its fifth run on a connection.
CALL_ROUNDS = 12
#: Seconds an idle worker behind a transaction pooler may take to find a new job (it polls about every second;
#: its own poll interval in the test is a minute, so only the polling doorbell can pick the job up in time).
POLL_PICKUP_S = 5.0
#: Milliseconds of the statement timeout in the timeout tests, and seconds of any other wait here.
SHORT_TIMEOUT_MS = 300
TIMEOUT_S = 20.0


@pytest.fixture
def transaction_pooler(database_server: DatabaseServer) -> Iterator[PgBouncer]:
    with running_pgbouncer(database_server.admin_url, mode=TRANSACTION) as bouncer:
        yield bouncer


@pytest.fixture
def unused_port_url() -> str:
    """A database URL where nothing listens."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nothing?connect_timeout=1"


@pytest.fixture
def default_statement_timeout(db: Db) -> str:
    row = db.execute("select current_setting('statement_timeout') as value").fetchone()
    assert row is not None
    return str(row["value"])


def a_job(queue: str = "default") -> NewJob:
    return NewJob(
        id=str(uuid.uuid4()),
        queue_name=queue,
        actor_name="record",
        args=["x"],
        kwargs={},
        options={},
        priority=0,
        max_retries=3,
    )


# -- finding 1: which connections may carry session state ---------------------------------------------------
@pytest.mark.parametrize("mode", ["direct", SESSION, TRANSACTION])
def test_detection_tells_a_session_of_our_own_from_a_transaction_pooler(
    mode: str, database_server: DatabaseServer, database_url: str, default_statement_timeout: str
) -> None:
    if mode == "direct":
        found = detect_session_semantics(database_url)
        assert found.session_state, found.reason
        return
    with running_pgbouncer(database_server.admin_url, mode=mode) as bouncer:
        found = detect_session_semantics(bouncer.url(database_url))

        assert found.session_state is (mode == SESSION), found.reason
        assert leftovers(pooled_sessions(bouncer, database_url), default_statement_timeout) == []


def test_poll_only_skips_the_detection() -> None:
    transport = PostgresTransport("postgresql://nobody@127.0.0.1:1/none", poll_only=True)
    found = transport.session_semantics()

    assert not found.session_state
    assert "DATABASE_POLL_ONLY" in found.reason


def test_the_doorbell_polls_when_it_cannot_tell(unused_port_url: str) -> None:
    transport = PostgresTransport(unused_port_url)
    try:
        assert isinstance(transport.doorbell(), PollingDoorbell)
    finally:
        transport.close()


def test_listen_delivers_tells_whether_a_self_rung_notification_arrives(
    transaction_pooler: PgBouncer, database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as direct:
        assert listen_delivers(direct, ring_from(database_url), timeout_s=2)
    pooled_url = transaction_pooler.url(database_url)
    with psycopg.connect(pooled_url, autocommit=True, prepare_threshold=None) as pooled:
        assert not listen_delivers(pooled, ring_from(pooled_url), timeout_s=0.5)


def test_queue_calls_through_a_transaction_pooler_leave_no_prepared_statements(
    transaction_pooler: PgBouncer, database_url: str, default_statement_timeout: str
) -> None:
    # Given two workers on one transaction pooler, and no pooler setting
    url = transaction_pooler.url(database_url)
    workers = [PostgresTransport(url, pool_size=2) for _ in range(2)]
    infos = [
        WorkerInfo(worker_id=f"worker-{n}", hostname="test", pid=os.getpid(), queues=("default",))
        for n in range(2)
    ]
    try:
        for worker, info in zip(workers, infos, strict=True):
            worker.register_worker(info, HEARTBEAT_PRESENCE)
        # When they take turns calling the queue, each call often enough to be worth preparing
        for _ in range(CALL_ROUNDS):
            for worker, info in zip(workers, infos, strict=True):
                worker.enqueue([a_job()])
                claimed = worker.claim(info.worker_id, "default", 1, 60_000, str(uuid.uuid4()))
                claims = [Claim(job.id, job.claim_token) for job in claimed]
                reply = worker.heartbeat(
                    info.worker_id, claims, lease_ms=60_000, queues=info.queues, max_rescues=5
                )
                assert reply.held == {c.job_id for c in claims}
                assert worker.complete_many(claims) == {c.job_id for c in claims}
                assert worker.release(claims) == 0
                worker.rescue(5)
                worker.stats()
    finally:
        for worker in workers:
            worker.close()

    # Then every call succeeded, and no pooled server connection was left a prepared statement or a setting
    assert leftovers(pooled_sessions(transaction_pooler, database_url), default_statement_timeout) == []


def test_a_worker_behind_a_transaction_pooler_polls_instead_of_listening(
    transaction_pooler: PgBouncer, database_url: str, db: Db, default_statement_timeout: str
) -> None:
    # Given a worker behind the transaction pooler whose own poll is a minute away
    transport = PostgresTransport(transaction_pooler.url(database_url), pool_size=2)
    broker = build_broker(transport, poll_interval_ms=60_000)
    actors = declare_test_actors(broker)
    try:
        with running_worker(broker, threads=1):
            wait_for_status(db, insert_job(db, actor_name="record", args=["first"]), "completed", TIMEOUT_S)

            # When a row is inserted while it is idle
            job_id = insert_job(db, actor_name="record", args=["polled"])

            # Then it finds it on its own, long before its poll interval
            wait_for_status(db, job_id, "completed", POLL_PICKUP_S)
    finally:
        broker.close()

    # And it left no LISTEN (nor anything else) on a pooled connection
    assert actors.runs.keys("record") == ["first", "polled"]
    assert leftovers(pooled_sessions(transaction_pooler, database_url), default_statement_timeout) == []


# -- finding 2: readiness -------------------------------------------------------------------------------
def test_readiness_probes_leave_no_statement_timeout_in_the_pool(
    transaction_pooler: PgBouncer, database_url: str, default_statement_timeout: str
) -> None:
    transport = PostgresTransport(transaction_pooler.url(database_url), pool_size=1, poll_only=True)
    probe = ReadinessProbe(transport, timeout_ms=2_000)
    try:
        for _ in range(10):
            readiness = probe.check()
            assert readiness.ready, readiness.reason
    finally:
        transport.close()

    assert leftovers(pooled_sessions(transaction_pooler, database_url), default_statement_timeout) == []


# -- finding 3: migrations ------------------------------------------------------------------------------
def test_migrate_through_a_transaction_pooler_leaves_no_advisory_lock(
    transaction_pooler: PgBouncer, database_server: DatabaseServer
) -> None:
    name = f"migrate_{uuid.uuid4().hex[:12]}"
    url = database_server.create_database(name)
    try:
        # Given migrations applied through the transaction pooler
        assert apply_migrations(transaction_pooler.url(url), bootstrap=True)

        # Then no advisory lock stays behind on the server
        with psycopg.connect(url, autocommit=True) as conn:
            locks = conn.execute(
                "select pid, objid from pg_locks where locktype = 'advisory' and database ="
                " (select oid from pg_database where datname = current_database())"
            ).fetchall()
        assert locks == []

        # And another applier through the pooler finds nothing to do, promptly
        assert apply_migrations(transaction_pooler.url(url), bootstrap=True) == []
    finally:
        transaction_pooler.stop()  # its server connections hold the database open
        database_server.drop(name)


# -- issue 10 item 10: our own statements are bounded on our own connections ------------------------------
@pytest.mark.parametrize("through", ["direct", TRANSACTION])
def test_each_call_carries_its_own_statement_timeout(
    through: str,
    transaction_pooler: PgBouncer,
    database_url: str,
    db: Db,
    default_statement_timeout: str,
) -> None:
    url = database_url if through == "direct" else transaction_pooler.url(database_url)
    calls = FunctionPool(url, name="timeout-test", size=1, statement_timeout_ms=SHORT_TIMEOUT_MS)
    try:
        # A call that runs too long is cancelled by the server, and reported as a lost connection (retryable)
        started = time.monotonic()
        with pytest.raises(ConnectionClosed, match="statement timeout"):
            calls.value("select pg_sleep(%s)", (3,), idempotent=False)
        assert time.monotonic() - started < 2.0

        # A call may ask for more time; and the setting never outlives the call
        assert calls.value("select current_setting('statement_timeout')", (), idempotent=True) == "300ms"
        assert calls.value("select 1 from pg_sleep(0.4)", (), idempotent=True, timeout_ms=2_000) == 1
    finally:
        calls.close()
    if through == TRANSACTION:
        assert leftovers(pooled_sessions(transaction_pooler, database_url), default_statement_timeout) == []


# -- finding 4: a connection that never comes is reported in seconds --------------------------------------
def test_a_call_waiting_for_a_full_pooler_gives_up_and_says_why(
    database_server: DatabaseServer, database_url: str
) -> None:
    with running_pgbouncer(database_server.admin_url, mode=SESSION, pool_size=1) as bouncer:
        url = bouncer.url(database_url)
        # Given a session pooler whose one server connection another client holds
        with psycopg.connect(url, autocommit=True) as holder:
            holder.execute("select 1")
            calls = FunctionPool(url, name="full-pooler-test", size=1, statement_timeout_ms=SHORT_TIMEOUT_MS)
            try:
                # When a call waits for a server connection, it gives up at its deadline and says why
                started = time.monotonic()
                with pytest.raises(ConnectionClosed, match="no answer from the database within"):
                    calls.value("select 1", (), idempotent=False)
                assert time.monotonic() - started < 5.0

                # And the detection says so too instead of waiting for the pooler's own timeout
                started = time.monotonic()
                with pytest.raises(ConnectionClosed, match="answered nothing within"):
                    detect_session_semantics(url, timeout_s=1.5)
                assert time.monotonic() - started < 5.0
            finally:
                calls.close()


def test_detection_runs_once_per_transport_and_concurrently_safe(database_url: str) -> None:
    transport = PostgresTransport(database_url, pool_size=2)
    results: list[bool] = []
    try:
        threads = [
            threading.Thread(target=lambda: results.append(transport.session_semantics().session_state))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
        assert results == [True] * 4
        assert transport.session_semantics() is transport.session_semantics()
    finally:
        transport.close()
