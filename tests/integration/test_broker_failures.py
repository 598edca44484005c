"""Failures: retries in the row, dead letters, throws, retry_when, time and age limits, bad rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from broker.broker import SupabaseBroker
from tests.support.actors import OVERRUN_TIME_LIMIT_MS, declare_test_actors
from tests.support.brokers import (
    BrokerFactory,
    Db,
    insert_job,
    job,
    running_worker,
    wait_for_status,
    wait_until,
)

#: Seconds any single job of these tests may take to reach its final state.
SETTLE_TIMEOUT_S = 10
#: Milliseconds of backoff in the test that watches a job wait for its retry (Dramatiq waits 50-100% of it).
VISIBLE_BACKOFF_MS = 800
TRACEBACK_HEADER = "Traceback (most recent call last)"


def assert_keeps_working(actors: SimpleNamespace, db: Db) -> None:
    """A job sent now still completes: the worker survived what came before."""
    message = actors.record.send("after")
    wait_for_status(db, message.message_id, "completed", SETTLE_TIMEOUT_S)
    assert "after" in actors.runs.keys("record")


def test_a_retry_shows_in_the_row_then_the_job_succeeds(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    # Given a job that fails once, with a backoff long enough to watch
    message = actors.flaky.send_with_options(
        args=("once", 1), min_backoff=VISIBLE_BACKOFF_MS, max_backoff=VISIBLE_BACKOFF_MS
    )

    with running_worker(broker, threads=1):
        # When it fails, then its row waits for the retry: retry count, error and a later run time
        waiting = wait_until(
            lambda: (row := job(db, message.message_id))["retry_count"] == 1 and row,
            SETTLE_TIMEOUT_S,
            "the first retry to be counted",
        )
        assert waiting["status"] == "pending"
        assert waiting["error_message"].startswith("RuntimeError: flaky once failed attempt 1")
        assert waiting["run_at"] - waiting["created_at"] >= timedelta(milliseconds=VISIBLE_BACKOFF_MS // 2)
        assert waiting["locked_by"] is None and waiting["claim_token"] is None

        # And it then succeeds
        done = wait_for_status(db, message.message_id, "completed", SETTLE_TIMEOUT_S)

    assert done["retry_count"] == 1
    assert done["error_message"] == waiting["error_message"]  # the last error is kept
    assert done["started_at"] >= waiting["run_at"]
    assert [run.retries for run in actors.runs.of("flaky", "started")] == [0, 1]


def test_retries_exhausted_leave_the_row_failed_with_error_and_traceback(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    message = actors.fail_always.send("x")  # max_retries=2

    with running_worker(broker, threads=1):
        row = wait_for_status(db, message.message_id, "failed", SETTLE_TIMEOUT_S)

    assert row["retry_count"] == 2
    assert row["error_message"].startswith("RuntimeError: boom x")
    assert TRACEBACK_HEADER in row["error_message"]
    assert "in fail_always" in row["error_message"]
    assert row["completed_at"] is not None and row["lease_expires_at"] is None
    assert len(actors.runs.of("fail_always")) == 3


def test_throws_fails_the_job_without_a_retry(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    message = actors.reject.send("bad input")

    with running_worker(broker, threads=1):
        row = wait_for_status(db, message.message_id, "failed", SETTLE_TIMEOUT_S)

    assert row["retry_count"] == 0
    assert row["error_message"].startswith("ValueError: rejected bad input")
    assert TRACEBACK_HEADER in row["error_message"]
    assert len(actors.runs.of("reject")) == 1


def test_retry_when_decides_instead_of_max_retries(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    # Given an actor with max_retries=5 whose retry_when allows a single retry
    message = actors.picky.send("p")

    with running_worker(broker, threads=1):
        row = wait_for_status(db, message.message_id, "failed", SETTLE_TIMEOUT_S)

    assert row["retry_count"] == 1
    assert row["error_message"].startswith("TransientError: transient p")
    assert len(actors.runs.of("picky")) == 2


@pytest.mark.parametrize("max_retries", [0, 1])
def test_max_retries_of_a_message_overrides_the_actor(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db, max_retries: int
) -> None:
    # Given an actor declared with max_retries=2, and a message that asks for fewer
    message = actors.fail_always.send_with_options(args=("m",), max_retries=max_retries)
    assert job(db, message.message_id)["max_retries"] == max_retries

    with running_worker(broker, threads=1):
        row = wait_for_status(db, message.message_id, "failed", SETTLE_TIMEOUT_S)

    assert row["retry_count"] == max_retries
    assert len(actors.runs.of("fail_always")) == max_retries + 1


def test_the_rows_max_retries_applies_to_rows_inserted_directly(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    # Given a row inserted with plain SQL and max_retries=1, for an actor declared with max_retries=2
    job_id = insert_job(db, actor_name="fail_always", args=["edge"], max_retries=1)

    with running_worker(broker, threads=1):
        row = wait_for_status(db, job_id, "failed", SETTLE_TIMEOUT_S)

    assert row["retry_count"] == 1
    assert len(actors.runs.of("fail_always")) == 2


def test_an_unknown_actor_waits_for_a_worker_that_knows_it_then_fails_after_the_grace(
    make_broker: BrokerFactory, db: Db
) -> None:
    # Given a job for an actor only newer workers know (a rolling deploy), and an older worker
    job_id = insert_job(db, actor_name="no_such_actor", args=[1])
    patient = make_broker(unknown_actor_grace_ms=600_000)
    actors = declare_test_actors(patient)

    # Then it goes back to the queue for later, counting no retry, and the worker keeps working
    with running_worker(patient, threads=1):
        row = wait_until(
            lambda: (r := job(db, job_id))["status"] == "pending" and r["error_message"] and r,
            SETTLE_TIMEOUT_S,
            "the job to be put back",
        )
        assert_keeps_working(actors, db)
    assert "waiting for a worker that knows actor 'no_such_actor'" in row["error_message"]
    assert row["run_at"] > row["created_at"] and row["retry_count"] == 0

    # And once the grace is over, a worker that still does not know it fails it with a message saying so
    db.execute("update public.coding_jobs set run_at = now() where id = %s", (job_id,))
    impatient = make_broker(unknown_actor_grace_ms=0)
    declare_test_actors(impatient)
    with running_worker(impatient, threads=1):
        row = wait_for_status(db, job_id, "failed", SETTLE_TIMEOUT_S)
    assert "no worker knows actor 'no_such_actor'" in row["error_message"]
    assert row["retry_count"] == 0


@pytest.mark.parametrize(
    ("columns", "reason"),
    [
        ({"args": {"a": 1}}, "args must be a JSON array, got object"),
        ({"kwargs": [1]}, "kwargs must be a JSON object, got array"),
        ({"options": ["x"]}, "options must be a JSON object, got array"),
    ],
    ids=["args-object", "kwargs-array", "options-array"],
)
def test_a_payload_that_does_not_decode_fails_its_row_and_the_worker_keeps_running(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db, columns: dict[str, Any], reason: str
) -> None:
    job_id = insert_job(db, actor_name="record", **columns)

    with running_worker(broker, threads=1):
        row = wait_for_status(db, job_id, "failed", SETTLE_TIMEOUT_S)
        assert_keeps_working(actors, db)

    assert row["error_message"] == f"payload does not decode: {reason}"
    assert actors.runs.keys("record") == ["after"]


def test_time_limit_interrupts_the_job_which_is_retried_then_failed(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    # The CLI emits process_boot, which starts TimeLimit's watchdog thread; an in-process worker must do it.
    broker.emit_after("process_boot")
    over = actors.overrun.send("over", 20 * OVERRUN_TIME_LIMIT_MS)  # max_retries=1
    under = actors.overrun.send("under", 0)

    with running_worker(broker, threads=2):
        row = wait_for_status(db, over.message_id, "failed", SETTLE_TIMEOUT_S)
        wait_for_status(db, under.message_id, "completed", SETTLE_TIMEOUT_S)

    assert row["retry_count"] == 1
    assert row["error_message"].startswith("TimeLimitExceeded")
    assert [run.retries for run in actors.runs.of("overrun", "started") if run.key == "over"] == [0, 1]
    assert [run.key for run in actors.runs.of("overrun", "finished")] == ["under"]


def test_max_age_fails_a_job_too_old_to_run(broker: SupabaseBroker, actors: SimpleNamespace, db: Db) -> None:
    # Given two rows whose messages may run within a minute of their creation, one created an hour ago
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    old = insert_job(
        db, actor_name="record", args=["old"], options={"max_age": 60_000}, created_at=an_hour_ago
    )
    fresh = insert_job(db, actor_name="record", args=["fresh"], options={"max_age": 60_000})

    with running_worker(broker, threads=1):
        row = wait_for_status(db, old, "failed", SETTLE_TIMEOUT_S)
        wait_for_status(db, fresh, "completed", SETTLE_TIMEOUT_S)

    # Then AgeLimit skipped the old one (message.fail(): a dead letter, no retry) and the fresh one ran
    assert row["retry_count"] == 0
    assert "age limit exceeded" in row["error_message"]
    assert actors.runs.keys("record") == ["fresh"]
