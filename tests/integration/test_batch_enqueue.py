"""Batch enqueue: many messages in one round trip, over every transport, with one doorbell ring per queue.

Rows inserted by one statement share one transaction, and with it one `created_at` (now() is the
transaction's start): that is how these tests see "one round trip" without counting calls.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import dramatiq
import psycopg
import pytest

from broker.batches import chunks
from broker.broker import SupabaseBroker
from broker.transport import NewJob
from tests.support.actors import OTHER_QUEUE
from tests.support.brokers import Db, status_counts

#: Messages per batch in these tests: more than one page of rows, far below MAX_BATCH_JOBS.
BATCH = 250


def _rows(db: Db) -> list[dict[str, Any]]:
    return list(db.execute("select id, queue_name, status, created_at from public.coding_jobs").fetchall())


def _rings(listener: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return [json.loads(note.payload) for note in listener.notifies(timeout=0.5)]


@pytest.fixture
def listener(database_url: str) -> Any:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("listen coding_jobs")
        yield conn


def test_enqueue_many_sends_a_batch_in_one_statement_and_rings_once_per_queue(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db, listener: psycopg.Connection[Any]
) -> None:
    # Given messages for two queues
    messages = [actors.record.message(f"k{i}") for i in range(BATCH)]
    messages += [actors.record_other.message(f"o{i}") for i in range(BATCH)]

    # When they are enqueued as one batch
    sent = broker.enqueue_many(messages)

    # Then every row is pending, all from one transaction, and the doorbell rang once per queue
    assert sent == messages
    rows = _rows(db)
    assert len(rows) == 2 * BATCH
    assert {row["status"] for row in rows} == {"pending"}
    assert len({row["created_at"] for row in rows}) == 1
    rings = _rings(listener)
    assert sorted(ring["queue"] for ring in rings) == sorted(["default", OTHER_QUEUE])
    assert {ring["delay_ms"] for ring in rings} == {0}

    # And sending the same batch again (a lost reply) adds nothing
    broker.enqueue_many(messages)
    assert status_counts(db) == {"pending": 2 * BATCH}


def test_batched_sends_holds_sends_and_groups_until_the_block_ends(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    # When a block sends single messages and runs a group
    with broker.batched_sends():
        actors.record.send("single")
        dramatiq.group(actors.record.message(f"g{i}") for i in range(10)).run()
        nested = actors.record.message("nested")
        with broker.batched_sends():
            broker.enqueue(nested)
        # Then nothing reached the queue yet
        assert _rows(db) == []

    # And at its end all of them arrive together
    rows = _rows(db)
    assert len(rows) == 12
    assert len({row["created_at"] for row in rows}) == 1


def test_a_batched_block_that_raises_sends_nothing_of_its_own(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    # Given an outer block that keeps what it sent, and an inner one that raises
    with broker.batched_sends():
        actors.record.send("kept")
        with pytest.raises(RuntimeError), broker.batched_sends():
            actors.record.send("dropped")
            raise RuntimeError("the caller changed its mind")

    # Then only the outer block's message was sent
    assert len(_rows(db)) == 1

    # And a block that raises sends nothing at all
    with pytest.raises(RuntimeError), broker.batched_sends():
        actors.record.send("dropped too")
        raise RuntimeError("nothing goes")
    assert len(_rows(db)) == 1


def test_a_delayed_job_rings_with_its_delay_by_the_database_clock(
    broker: SupabaseBroker, actors: SimpleNamespace, listener: psycopg.Connection[Any]
) -> None:
    # When one job is sent now and one in a minute
    actors.record.send("now")
    actors.record.send_with_options(args=("later",), delay=60_000)

    # Then the rings say how long until each is due, measured by the database
    delays = [ring["delay_ms"] for ring in _rings(listener)]
    assert delays[0] == 0
    assert 59_000 <= delays[1] <= 60_000


def test_batches_above_the_limit_go_in_slices() -> None:
    rows = [
        NewJob(
            id=str(i),
            queue_name="q",
            actor_name="a",
            args=[],
            kwargs={},
            options={},
            priority=0,
            max_retries=0,
        )
        for i in range(7)
    ]
    assert [len(part) for part in chunks(rows, 3)] == [3, 3, 1]
