"""Dramatiq's results, groups, completion callbacks and rate limiters over the PostgreSQL backends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import dramatiq.broker
import pytest
from dramatiq.message import Message
from dramatiq.middleware import GroupCallbacks
from dramatiq.rate_limits import Barrier, ConcurrentRateLimiter, RateLimiterBackend
from dramatiq.rate_limits.backends import StubBackend
from dramatiq.results import ResultFailure, ResultMissing, Results, ResultTimeout
from psycopg import sql
from psycopg.errors import InsufficientPrivilege

from broker.broker import SupabaseBroker
from broker.errors import ConnectionClosed
from broker.postgres import PostgresTransport
from broker.results import PostgresRateLimiterBackend, PostgresResultBackend
from tests.support.brokers import Db, build_broker, running_worker, wait_until

#: Milliseconds any blocking get of a test may wait for a result.
RESULT_TIMEOUT_MS = 15_000
#: Seconds any other waited-for condition may take.
WAIT_S = 15.0
#: Milliseconds broker.join may wait for the queue to empty.
JOIN_TIMEOUT_MS = 15_000
#: A URL nothing listens on: every connection attempt fails at once.
DEAD_URL = "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1"


@pytest.fixture
def result_backend(database_url: str) -> Iterator[PostgresResultBackend]:
    backend = PostgresResultBackend(database_url)
    yield backend
    backend.close()


@pytest.fixture
def make_rate_limiter_backend(database_url: str) -> Iterator[Callable[[], PostgresRateLimiterBackend]]:
    """Builds rate-limiter backends, each with a pool of its own, as separate worker processes have."""
    backends: list[PostgresRateLimiterBackend] = []

    def make() -> PostgresRateLimiterBackend:
        backends.append(PostgresRateLimiterBackend(database_url))
        return backends[-1]

    yield make
    for backend in backends:
        backend.close()


@pytest.fixture
def rb_broker(
    database_url: str,
    result_backend: PostgresResultBackend,
    make_rate_limiter_backend: Callable[[], PostgresRateLimiterBackend],
) -> Iterator[SupabaseBroker]:
    """A broker with Results and GroupCallbacks on the PostgreSQL backends, wired as tasks/ would.

    Also Dramatiq's global broker for the test: `group.completed` looks results up through it.
    """
    previous = dramatiq.broker.global_broker
    broker = build_broker(PostgresTransport(database_url, pool_size=6))
    broker.add_middleware(Results(backend=result_backend))
    broker.add_middleware(GroupCallbacks(make_rate_limiter_backend()))
    dramatiq.set_broker(broker)
    try:
        yield broker
    finally:
        dramatiq.broker.global_broker = previous
        broker.close()


def unsent_messages(broker: SupabaseBroker, count: int) -> list[Message[Any]]:
    """Messages of an actor that stores results, never sent: keys for direct backend calls."""

    @dramatiq.actor(broker=broker, store_results=True)
    def keyed() -> None:
        pass

    return [keyed.message() for _ in range(count)]


def test_a_stored_result_is_returned_to_a_blocking_get(
    rb_broker: SupabaseBroker, result_backend: PostgresResultBackend
) -> None:
    @dramatiq.actor(broker=rb_broker, store_results=True)
    def add(x: int, y: int) -> int:
        return x + y

    message = add.send(2, 3)

    # Given no worker yet: no result, and a blocking get gives up at its timeout
    with pytest.raises(ResultMissing):
        message.get_result(backend=result_backend)
    started = time.monotonic()
    with pytest.raises(ResultTimeout):
        message.get_result(backend=result_backend, block=True, timeout=300)
    assert 0.29 <= time.monotonic() - started < 2.0

    # When a worker runs the message, then a blocking get returns the actor's value
    with running_worker(rb_broker):
        assert message.get_result(backend=result_backend, block=True, timeout=RESULT_TIMEOUT_MS) == 5


def test_a_group_waits_for_and_returns_every_result(rb_broker: SupabaseBroker) -> None:
    @dramatiq.actor(broker=rb_broker, store_results=True)
    def square(x: int) -> int:
        time.sleep(0.05 * x)
        return x * x

    with running_worker(rb_broker, threads=3):
        g = dramatiq.group([square.message(x) for x in (1, 2, 3)], broker=rb_broker).run()
        g.wait(timeout=RESULT_TIMEOUT_MS)

        assert g.completed
        assert g.completed_count == 3
        assert list(g.get_results()) == [1, 4, 9]


def test_a_group_completion_callback_runs_once_after_every_member(rb_broker: SupabaseBroker, db: Db) -> None:
    members_done: list[int] = []
    callbacks: list[tuple[str, int]] = []
    lock = threading.Lock()

    @dramatiq.actor(broker=rb_broker)
    def member(x: int) -> None:
        time.sleep(0.02 * x)
        with lock:
            members_done.append(x)

    @dramatiq.actor(broker=rb_broker)
    def finished(label: str) -> None:
        with lock:
            callbacks.append((label, len(members_done)))

    with running_worker(rb_broker, threads=3):
        g = dramatiq.group([member.message(x) for x in (1, 2, 3)], broker=rb_broker)
        g.add_completion_callback(finished.message("all done"))
        g.run()

        wait_until(lambda: callbacks, WAIT_S, "the completion callback to run")
        rb_broker.join("default", timeout=JOIN_TIMEOUT_MS)

    assert sorted(members_done) == [1, 2, 3]
    assert callbacks == [("all done", 3)]
    # The barrier was made of 3 parties in the counters table; two arrivals counted down, the third cleared it
    rows = db.execute("select key, value from public.queue_counters order by key").fetchall()
    assert [row["value"] for row in rows] == [1, 1]
    assert rows[1]["key"] == f"{rows[0]['key']}@events"


def test_a_failed_actor_stores_its_exception(
    rb_broker: SupabaseBroker, result_backend: PostgresResultBackend
) -> None:
    @dramatiq.actor(broker=rb_broker, store_results=True, max_retries=0)
    def explode() -> None:
        raise ValueError("boom")

    message = explode.send()

    with running_worker(rb_broker), pytest.raises(ResultFailure) as failure:
        message.get_result(backend=result_backend, block=True, timeout=RESULT_TIMEOUT_MS)

    assert (failure.value.orig_exc_type, failure.value.orig_exc_msg) == ("ValueError", "boom")


def test_results_expire_and_purge(
    rb_broker: SupabaseBroker, result_backend: PostgresResultBackend, db: Db
) -> None:
    short, long, empty = unsent_messages(rb_broker, 3)

    # Given results with a short and a long lifetime, and a None result (JSON null, not a missing row)
    result_backend.store_result(short, {"answer": [42]}, ttl=200)
    result_backend.store_result(long, "kept", ttl=60_000)
    result_backend.store_result(empty, None, ttl=60_000)
    assert result_backend.get_result(short) == {"answer": [42]}
    assert result_backend.get_result(empty) is None

    # When the short one's lifetime passes, then it is gone, and a purge deletes its row
    time.sleep(0.3)
    with pytest.raises(ResultMissing):
        result_backend.get_result(short)
    assert result_backend.purge_expired() == 1
    assert db.execute("select count(*) as n from public.queue_results").fetchone() == {"n": 2}
    assert result_backend.get_result(long) == "kept"


def run_script(backend: RateLimiterBackend) -> list[bool]:
    """The same operations, in order, on any rate-limiter backend; each result in a list."""
    results = []
    steps: list[tuple[str, tuple[Any, ...]]] = [
        ("add", ("a", 3, 60_000)),
        ("add", ("a", 5, 60_000)),
        ("decr", ("a", 1, 1, 60_000)),
        ("decr", ("a", 1, 1, 60_000)),
        ("decr", ("a", 1, 1, 60_000)),
        ("incr", ("b", 2, 3, 60_000)),
        ("incr", ("b", 2, 3, 60_000)),
        ("incr", ("b", 1, 3, 60_000)),
        ("decr", ("c", 1, 0, 60_000)),
        ("decr", ("c", 1, -5, 60_000)),
        ("incr", ("c", 4, 3, 60_000)),
        ("incr", ("c", 1, 3, 60_000)),
        ("incr_and_sum", ("w@2", lambda: ["w@2", "w@1"], 1, 2, 60_000)),
        ("incr_and_sum", ("w@1", lambda: ["w@1", "w@0"], 1, 2, 60_000)),
        ("incr_and_sum", ("w@2", lambda: ["w@2", "w@1"], 1, 2, 60_000)),
        ("incr_and_sum", ("w@3", lambda: ["w@3", "w@2"], 1, 2, 60_000)),
        ("incr_and_sum", ("w@3", lambda: ["w@3", "w@2"], 1, 2, 60_000)),
        ("add", ("short", 1, 100)),
        ("incr", ("fading", 5, 5, 100)),
        ("sleep", ()),
        ("add", ("short", 7, 60_000)),
        ("incr", ("short", 1, 8, 60_000)),
        ("incr", ("short", 1, 8, 60_000)),
        ("incr", ("fading", 5, 5, 60_000)),
    ]
    for name, args in steps:
        if name == "sleep":
            time.sleep(0.2)
            continue
        results.append(bool(getattr(backend, name)(*args)))
    return results


def test_counters_behave_like_dramatiqs_stub_backend(
    make_rate_limiter_backend: Callable[[], PostgresRateLimiterBackend],
) -> None:
    expected = [True, False, True, True, False, True, False, True, False, True, True, False]
    expected += [True, True, False, True, False, True, True, True, True, False, True]

    assert run_script(StubBackend()) == expected
    assert run_script(make_rate_limiter_backend()) == expected


def test_a_concurrent_rate_limiter_admits_only_its_limit_across_threads(
    make_rate_limiter_backend: Callable[[], PostgresRateLimiterBackend], db: Db
) -> None:
    limit = 2
    limiters = [ConcurrentRateLimiter(make_rate_limiter_backend(), "gpu", limit=limit) for _ in range(2)]
    holding = threading.Semaphore(0)
    release = threading.Event()
    held: list[bool] = []

    def hold(limiter: ConcurrentRateLimiter) -> None:
        with limiter.acquire(raise_on_failure=False) as acquired:
            held.append(acquired)
            holding.release()
            release.wait(WAIT_S)

    # Given two threads, on two backends, holding the limiter's two slots
    threads = [threading.Thread(target=hold, args=(limiter,)) for limiter in limiters]
    for thread in threads:
        thread.start()
    try:
        for _ in threads:
            assert holding.acquire(timeout=WAIT_S)
        assert held == [True, True]

        # Then a third acquire is refused
        with limiters[0].acquire(raise_on_failure=False) as acquired:
            assert acquired is False
    finally:
        release.set()
        for thread in threads:
            thread.join(WAIT_S)

    # When the holders release, then the slots are free again
    assert db.execute("select value from public.queue_counters where key = 'gpu'").fetchone() == {"value": 0}
    with limiters[1].acquire(raise_on_failure=False) as acquired:
        assert acquired is True


def test_a_concurrent_rate_limiter_never_admits_more_than_its_limit_under_contention(
    make_rate_limiter_backend: Callable[[], PostgresRateLimiterBackend],
) -> None:
    limit, workers, tries = 3, 8, 15
    lock = threading.Lock()
    active = [0]
    most = [0]
    admitted = [0]
    errors: list[BaseException] = []

    def work() -> None:
        limiter = ConcurrentRateLimiter(make_rate_limiter_backend(), "contended", limit=limit)
        try:
            for _ in range(tries):
                with limiter.acquire(raise_on_failure=False) as acquired:
                    if not acquired:
                        continue
                    with lock:
                        active[0] += 1
                        admitted[0] += 1
                        most[0] = max(most[0], active[0])
                    time.sleep(0.005)
                    with lock:
                        active[0] -= 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S * 2)

    assert errors == []
    assert not any(thread.is_alive() for thread in threads)
    assert 0 < admitted[0] < workers * tries
    assert most[0] <= limit


def test_a_barrier_blocks_until_its_last_party_arrives(
    make_rate_limiter_backend: Callable[[], PostgresRateLimiterBackend],
) -> None:
    backend = make_rate_limiter_backend()
    barrier = Barrier(backend, "meeting", ttl=60_000)
    assert barrier.create(parties=2)
    waited: list[bool] = []

    # Given one party blocked at the barrier
    waiter = threading.Thread(target=lambda: waited.append(barrier.wait(block=True, timeout=10_000)))
    waiter.start()
    time.sleep(0.1)
    assert waited == []

    # When the last party arrives, then the blocked one is released
    assert barrier.wait(block=False) is True
    waiter.join(WAIT_S)
    assert waited == [True]

    # And a barrier nobody clears times out
    lonely = Barrier(backend, "lonely", ttl=60_000)
    lonely.create(parties=3)
    started = time.monotonic()
    assert lonely.wait(block=True, timeout=300) is False
    assert 0.29 <= time.monotonic() - started < 2.0


def test_only_service_role_reaches_the_tables_and_functions(db: Db) -> None:
    def run_as(role: str, statement: str) -> None:
        with db.transaction():
            db.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
            db.execute(statement)

    for role in ("anon", "authenticated"):
        for statement in (
            "select public.queue_get_result('k')",
            "select public.queue_store_result('k', '1', 1000)",
            "select public.queue_counter_add('k', 1, 1000)",
            "select * from public.queue_results",
            "select * from public.queue_counters",
        ):
            with pytest.raises(InsufficientPrivilege):
                run_as(role, statement)

    run_as("service_role", "select public.queue_store_result('k', '1', 60000)")
    run_as("service_role", "select public.queue_counter_add('k', 1, 60000)")
    rows = db.execute(
        "select relname, relrowsecurity, relpersistence from pg_class"
        " where relname in ('queue_results', 'queue_counters') order by relname"
    ).fetchall()
    assert rows == [
        {"relname": "queue_counters", "relrowsecurity": True, "relpersistence": "p"},
        {"relname": "queue_results", "relrowsecurity": True, "relpersistence": "p"},
    ]


def test_unreachable_database_raises_connection_closed() -> None:
    results = PostgresResultBackend(DEAD_URL, pool_timeout_s=0.5)
    limits = PostgresRateLimiterBackend(DEAD_URL, pool_timeout_s=0.5)
    try:
        with pytest.raises(ConnectionClosed):
            results.get_result(Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={}))
        with pytest.raises(ConnectionClosed):
            limits.add("k", 1, 1000)
    finally:
        results.close()
        limits.close()


def test_a_dropped_connection_is_retried_for_reads_and_reported_for_writes(
    result_backend: PostgresResultBackend,
    make_rate_limiter_backend: Callable[[], PostgresRateLimiterBackend],
    rb_broker: SupabaseBroker,
    db: Db,
) -> None:
    limits = make_rate_limiter_backend()
    [message] = unsent_messages(rb_broker, 1)
    result_backend.store_result(message, "before", ttl=60_000)
    assert limits.add("k", 1, 60_000)

    # Given the server drops every pooled connection of both backends
    def drop() -> None:
        db.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where application_name in ('queue-worker-results', 'queue-worker-rate-limits')"
        )
        wait_until(
            lambda: (
                db.execute(
                    "select count(*) = 0 as gone from pg_stat_activity"
                    " where application_name in ('queue-worker-results', 'queue-worker-rate-limits')"
                ).fetchone()
                == {"gone": True}
            ),
            WAIT_S,
            "the backends' connections to end",
        )

    drop()

    # Then a read is retried on a fresh connection, and a write (maybe committed) reports the lost connection
    assert result_backend.get_result(message) == "before"
    with pytest.raises(ConnectionClosed):
        limits.incr("k", 1, 5, 60_000)
    assert limits.incr("k", 1, 5, 60_000) is True


def test_a_pickle_encoder_is_refused(database_url: str) -> None:
    with pytest.raises(ValueError, match="JSON"):
        PostgresResultBackend(database_url, encoder=dramatiq.PickleEncoder())
