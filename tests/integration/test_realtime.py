"""Realtime wake-ups: the doorbell against a Phoenix-channel stand-in; the migration's Broadcast trigger."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from loguru import logger
from psycopg.types.json import Jsonb

from broker.realtime import CANCEL_EVENT, RING_EVENT, TOPIC, RealtimeDoorbell
from broker.rest import RestTransport
from tests.support.realtime_server import RealtimeServer

#: Seconds any wait in these tests may take.
DEADLINE_S = 5.0
KEY = "service-role-key-for-tests"


class Rings:
    """What a doorbell rang, in order; waits are bounded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, int]] = []
        self._changed = threading.Condition()

    def __call__(self, queue: str | None, run_at_ms: int) -> None:
        with self._changed:
            self.calls.append((queue, run_at_ms))
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = DEADLINE_S) -> list[tuple[str | None, int]]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.calls) >= count, timeout=timeout_s), (
                f"expected {count} rings within {timeout_s} s, got {self.calls}"
            )
            return list(self.calls)


def not_the_stand_in(record: Any) -> bool:
    """Loguru records of the worker's side: the stand-in server's own log lines are not ours to judge."""
    return not str(record["name"]).startswith(("websockets.server", "tests.support"))


def worker_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The standard-library log records of the worker's side (the stand-in server's own are not ours)."""
    return [record for record in caplog.records if not record.name.startswith("websockets.server")]


@pytest.fixture
def server() -> Iterator[RealtimeServer]:
    running = RealtimeServer(KEY)
    running.start()
    yield running
    running.stop()


def fast_doorbell(url: str, key: str = KEY) -> RealtimeDoorbell:
    return RealtimeDoorbell(url, key, initial_backoff_s=0.05, max_backoff_s=0.2, join_timeout_s=2)


@pytest.fixture
def doorbell(server: RealtimeServer) -> Iterator[RealtimeDoorbell]:
    bell = fast_doorbell(server.url)
    yield bell
    bell.stop()


def test_rings_on_subscribe_and_on_each_broadcast(server: RealtimeServer, doorbell: RealtimeDoorbell) -> None:
    rings = Rings()
    doorbell.start(rings)

    # The (re)subscribe ring: anything may have arrived while no one listened
    assert rings.wait_for(1) == [(None, 0)]
    assert server.versions == ["1.0.0"]

    # Rings carry the queue and run time; other events are not rings; a malformed ring still wakes
    assert server.broadcast("something_else", {"queue": "ignored", "run_at": 1}) == 1
    server.broadcast(RING_EVENT, {"queue": "default", "run_at": 1_700_000_000_000})
    server.broadcast(RING_EVENT, {"run_at": "soon"})
    assert rings.wait_for(3) == [(None, 0), ("default", 1_700_000_000_000), (None, 0)]


def test_resubscribes_and_rings_when_the_server_comes_back(
    server: RealtimeServer, doorbell: RealtimeDoorbell
) -> None:
    rings = Rings()
    doorbell.start(rings)
    rings.wait_for(1)

    # When the server goes away (1001 Going Away) for a while, nothing rings
    server.stop()
    time.sleep(0.5)
    assert rings.calls == [(None, 0)] and doorbell.running

    # When it comes back on the same port, the doorbell joins again and rings at once
    server.start()
    assert server.wait_for_joins(2, DEADLINE_S)
    assert rings.wait_for(2)[1] == (None, 0)
    server.broadcast(RING_EVENT, {"queue": "default", "run_at": 5})
    assert rings.wait_for(3)[2] == ("default", 5)


def test_resubscribes_when_the_connection_is_cut(server: RealtimeServer, doorbell: RealtimeDoorbell) -> None:
    rings = Rings()
    doorbell.start(rings)
    rings.wait_for(1)

    server.drop_connections()  # no close frame, as when a network path dies

    assert server.wait_for_joins(2, DEADLINE_S)
    assert rings.wait_for(2) == [(None, 0), (None, 0)]


def test_a_refused_join_never_rings_and_the_doorbell_keeps_trying(
    server: RealtimeServer, doorbell: RealtimeDoorbell, caplog: pytest.LogCaptureFixture
) -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="TRACE", format="{message}", filter=not_the_stand_in)
    caplog.set_level(logging.DEBUG)
    try:
        # Given a server that refuses every join
        server.refuse_joins = True
        rings = Rings()
        doorbell.start(rings)

        # Then the doorbell rebuilds its client and asks again, and never rings meanwhile
        assert server.wait_for_joins(3, DEADLINE_S, refused=True)
        assert rings.calls == []

        # When the server accepts joins again, the doorbell subscribes and rings
        server.refuse_joins = False
        assert rings.wait_for(1) == [(None, 0)]
    finally:
        logger.remove(sink)
    assert any("CHANNEL_ERROR" in line for line in lines)
    assert not any(KEY in line for line in lines)
    assert not any(KEY in record.getMessage() for record in worker_records(caplog))


def test_a_wrong_key_is_refused_at_the_handshake_and_never_logged(
    server: RealtimeServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong_key = "not-the-service-role-key"
    lines: list[str] = []
    sink = logger.add(lines.append, level="TRACE", format="{message}", filter=not_the_stand_in)
    caplog.set_level(logging.DEBUG)
    bell = fast_doorbell(server.url, wrong_key)
    try:
        rings = Rings()
        bell.start(rings)
        deadline = time.monotonic() + DEADLINE_S
        while len(server.versions) < 3:
            assert time.monotonic() < deadline, "the doorbell stopped retrying"
            time.sleep(0.05)
        assert rings.calls == [] and server.joins == 0
    finally:
        bell.stop()
        logger.remove(sink)
    assert any("failed" in line for line in lines)
    assert not any(wrong_key in line for line in lines)
    assert not any(wrong_key in record.getMessage() for record in worker_records(caplog))


def test_stop_is_prompt_even_while_reconnecting(server: RealtimeServer) -> None:
    server.stop()  # nothing listens: the doorbell is in its connect-and-back-off loop
    bell = RealtimeDoorbell(server.url, KEY, initial_backoff_s=10.0, join_timeout_s=10)
    bell.start(Rings())
    time.sleep(0.2)

    started = time.monotonic()
    bell.stop()

    assert time.monotonic() - started < 1.0
    assert not bell.running


def test_the_rest_transport_rings_through_realtime(server: RealtimeServer) -> None:
    rest = RestTransport(server.url, KEY, realtime=True)
    bell = rest.doorbell()
    assert isinstance(bell, RealtimeDoorbell)
    try:
        rings = Rings()
        bell.start(rings)
        assert rings.wait_for(1) == [(None, 0)]
    finally:
        bell.stop()
        rest.close()
    assert RestTransport(server.url, KEY, realtime=False).doorbell() is None


def test_inserts_broadcast_one_small_ring_per_queue_and_statement(
    db: psycopg.Connection[dict[str, Any]],
) -> None:
    # Given Supabase's realtime.send, recording what it would send (plain PostgreSQL has none)
    db.execute("create schema realtime")
    db.execute("create table realtime.sent (payload jsonb, event text, topic text, private boolean)")
    db.execute(
        "create function realtime.send(payload jsonb, event text, topic text, private boolean default true)"
        " returns void language sql"
        " as $$ insert into realtime.sent values (payload, event, topic, private) $$"
    )

    # When the service role enqueues three jobs in two queues, and the Edge Function inserts one row
    jobs = [{"id": str(uuid.uuid4()), "actor_name": "noop", "queue_name": q} for q in ("a", "a", "b")]
    with db.transaction():
        db.execute("set local role service_role")
        db.execute("select public.enqueue_jobs(%s::jsonb)", (Jsonb(jobs),))
        db.execute("insert into public.coding_jobs (prompt, priority) values ('hello', 5)")

    # Then one ring per queue and statement went out on the private topic, carrying no row data
    sent = db.execute("select * from realtime.sent order by payload ->> 'queue'").fetchall()
    assert [(r["payload"]["queue"], r["event"], r["topic"], r["private"]) for r in sent] == [
        ("a", RING_EVENT, TOPIC, True),
        ("b", RING_EVENT, TOPIC, True),
        ("default", RING_EVENT, TOPIC, True),
    ]
    assert all(set(r["payload"]) == {"queue", "run_at", "delay_ms"} for r in sent)
    assert all(r["payload"]["delay_ms"] == 0 for r in sent)
    assert all(abs(r["payload"]["run_at"] / 1000 - time.time()) < 60 for r in sent)


def test_a_cancellation_is_broadcast_and_the_doorbell_passes_it_on(
    server: RealtimeServer, doorbell: RealtimeDoorbell, db: psycopg.Connection[dict[str, Any]]
) -> None:
    # Given Supabase's realtime.send, recording what it would send, and a running job
    db.execute("create schema realtime")
    db.execute("create table realtime.sent (payload jsonb, event text, topic text, private boolean)")
    db.execute(
        "create function realtime.send(payload jsonb, event text, topic text, private boolean default true)"
        " returns void language sql"
        " as $$ insert into realtime.sent values (payload, event, topic, private) $$"
    )
    db.execute("select public.register_worker('rt', 'heartbeat', 60000)")
    job_id = db.execute("insert into public.coding_jobs (prompt) values ('x') returning id").fetchone()["id"]  # type: ignore[index]
    db.execute("select * from public.claim_jobs('rt', 'default', 1, 60000, %s::uuid)", (str(uuid.uuid4()),))

    # When the service cancels it
    db.execute("select * from public.cancel_jobs(array[%s]::uuid[])", (job_id,))

    # Then a `cancel` event naming only the job went out on the private topic
    [sent] = db.execute("select * from realtime.sent where event = %s", (CANCEL_EVENT,)).fetchall()
    assert (sent["payload"], sent["topic"], sent["private"]) == ({"job": str(job_id)}, TOPIC, True)

    # And a worker's doorbell that hears it passes the job's id on (and rings nothing)
    cancels: list[str] = []
    rings = Rings()
    doorbell.start(rings, cancels.append)
    rings.wait_for(1)
    server.broadcast(CANCEL_EVENT, sent["payload"])
    deadline = time.monotonic() + DEADLINE_S
    while not cancels and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cancels == [str(job_id)] and rings.calls == [(None, 0)]
