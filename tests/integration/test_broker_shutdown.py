"""Shutdown, requeue and leases: prefetched and abandoned jobs go back to pending, lost claims are fenced."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from broker.broker import SupabaseBroker
from tests.support.actors import declare_test_actors
from tests.support.brokers import (
    BrokerFactory,
    Db,
    Settlements,
    job,
    jobs,
    running_worker,
    status_counts,
    wait_for_status,
    wait_until,
)

#: Seconds any single job of these tests may take to reach the state a test waits for.
SETTLE_TIMEOUT_S = 10
#: Seconds between the end of a run and its ack: no network retry is expected.
ACK_AFTER_RUN_TIMEOUT_S = 2
#: Milliseconds a slow job runs: long enough to act while it runs.
SLOW_JOB_MS = 1_000


def claimed(db: Db) -> int:
    return status_counts(db).get("processing", 0)


def test_prefetched_jobs_go_back_to_pending_on_shutdown(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    # Given six slow jobs and a worker with one thread that claims four at a time
    messages = [actors.slow.send(f"slow-{i}", SLOW_JOB_MS) for i in range(6)]
    ids = [m.message_id for m in messages]

    with running_worker(broker, threads=1, prefetch=4):
        # When it has claimed four and started one
        wait_until(
            lambda: claimed(db) == 4 and actors.runs.of("slow", "started"), SETTLE_TIMEOUT_S, "4 claims"
        )
        (running,) = actors.runs.of("slow", "started")
        # ... and stops (leaving the with-block) while the first one runs

    # Then the running job completed, and the prefetched ones went back to pending, no retry counted
    wait_for_status(db, running.message_id, "completed", SETTLE_TIMEOUT_S)
    rows = {str(row["id"]): row for row in jobs(db, ids)}
    waiting = [row for job_id, row in rows.items() if job_id != running.message_id]
    assert [row["status"] for row in waiting] == ["pending"] * 5
    for row in waiting:
        assert row["retry_count"] == 0 and row["error_message"] is None
        assert row["locked_by"] is None and row["claim_token"] is None and row["started_at"] is None
    assert [run.key for run in actors.runs.of("slow", "started")] == [running.key]


def test_a_job_still_running_at_the_stop_deadline_is_stopped_before_it_goes_back(
    broker: SupabaseBroker, actors: SimpleNamespace, settlements: Settlements, db: Db
) -> None:
    # Given a job that is still running when the worker's stop deadline passes
    message = actors.slow.send("overdue", 20 * SLOW_JOB_MS)
    with running_worker(broker, threads=1, stop_timeout_ms=100):
        wait_until(lambda: actors.runs.of("slow", "started"), SETTLE_TIMEOUT_S, "the job to start")

    # When the broker closes
    broker.close()

    # Then its run was stopped first (it never finished), and only then did the job go back to pending,
    # no retry counted, for another worker to run: never claimable while its thread still runs it
    assert settlements.wait_settled(message.message_id, ACK_AFTER_RUN_TIMEOUT_S) == "nack"
    assert actors.runs.of("slow", "finished") == []
    row = job(db, message.message_id)
    assert (row["status"], row["retry_count"], row["rescue_count"], row["claim_token"]) == (
        "pending",
        0,
        0,
        None,
    )


def test_a_job_whose_claim_was_taken_over_is_stopped_and_never_settled_by_the_late_worker(
    broker: SupabaseBroker, actors: SimpleNamespace, settlements: Settlements, db: Db
) -> None:
    message = actors.slow.send("taken", 20 * SLOW_JOB_MS)

    with running_worker(broker, threads=1):
        # Given a running job whose claim another holder took over (as a rescue would)
        wait_until(lambda: actors.runs.of("slow", "started"), SETTLE_TIMEOUT_S, "the job to start")
        taken = db.execute(
            "update public.coding_jobs set claim_token = gen_random_uuid(), locked_by = 'another-worker',"
            " lease_expires_at = now() + interval '1 minute' where id = %s and status = 'processing'"
            " returning claim_token",
            (message.message_id,),
        ).fetchone()
        assert taken is not None

        # When the worker's next heartbeat learns it no longer holds it, then it stops the run at once,
        # long before the run would have ended
        assert settlements.wait_settled(message.message_id, SETTLE_TIMEOUT_S) == "nack"
        assert actors.runs.of("slow", "finished") == []
    broker.close()

    # And the row is still the new holder's, untouched
    row = job(db, message.message_id)
    assert (row["status"], row["locked_by"], row["claim_token"]) == (
        "processing",
        "another-worker",
        taken["claim_token"],
    )
    assert (row["retry_count"], row["error_message"], row["completed_at"]) == (0, None, None)


@pytest.mark.parametrize(
    ("options", "settled_as"),
    [({}, "ack"), ({"max_retries": 1}, "ack"), ({"max_retries": 0}, "nack")],
    ids=["complete", "retry", "dead-letter"],
)
def test_a_late_settle_of_a_job_taken_over_is_fenced(
    broker: SupabaseBroker,
    actors: SimpleNamespace,
    settlements: Settlements,
    db: Db,
    options: dict[str, int],
    settled_as: str,
) -> None:
    fail = bool(options)
    # A job that ends between two heartbeats: the worker settles it before it learns the claim was taken
    message = actors.slow.send_with_options(args=("taken", SLOW_JOB_MS // 5, fail), **options)

    with running_worker(broker, threads=1):
        wait_until(lambda: actors.runs.of("slow", "started"), SETTLE_TIMEOUT_S, "the job to start")
        taken = db.execute(
            "update public.coding_jobs set claim_token = gen_random_uuid(), locked_by = 'another-worker',"
            " lease_expires_at = now() + interval '1 minute' where id = %s and status = 'processing'"
            " returning claim_token",
            (message.message_id,),
        ).fetchone()
        assert taken is not None
        settled = settlements.wait_settled(message.message_id, SETTLE_TIMEOUT_S)
        assert settled in (settled_as, "nack")  # "nack" when a heartbeat stopped it first
    broker.close()

    row = job(db, message.message_id)
    assert (row["status"], row["locked_by"], row["claim_token"]) == (
        "processing",
        "another-worker",
        taken["claim_token"],
    )
    assert (row["retry_count"], row["error_message"], row["completed_at"]) == (0, None, None)


def test_the_lease_of_a_running_job_is_extended(make_broker: BrokerFactory, db: Db) -> None:
    broker = make_broker(lease_ms=1_200)  # extended every 400 ms
    actors = declare_test_actors(broker)
    message = actors.slow.send("long", 3 * SLOW_JOB_MS)

    with running_worker(broker, threads=1):
        wait_until(lambda: actors.runs.of("slow", "started"), SETTLE_TIMEOUT_S, "the job to start")
        first = job(db, message.message_id)["lease_expires_at"]
        # Past the first lease's end, the job is still held, with a later lease
        time.sleep(1.5)
        later = job(db, message.message_id)
        assert later["status"] == "processing"
        assert later["lease_expires_at"] > first
        wait_for_status(db, message.message_id, "completed", SETTLE_TIMEOUT_S)

    assert len(actors.runs.of("slow", "started")) == 1


@pytest.mark.parametrize("claim_ahead", [0, None], ids=["free-threads-only", "dramatiq-prefetch"])
def test_claim_ahead_zero_never_holds_a_job_it_cannot_start(
    make_broker: BrokerFactory, db: Db, claim_ahead: int | None
) -> None:
    # Given two slow jobs and a worker with one thread
    broker = make_broker(claim_ahead=claim_ahead)
    actors = declare_test_actors(broker)
    first, second = (actors.slow.send(f"long-{i}", SLOW_JOB_MS * 3) for i in range(2))

    with running_worker(broker, threads=1):
        # When it has started one of them
        wait_until(lambda: claimed(db) >= 1, SETTLE_TIMEOUT_S, "a job to be claimed")
        time.sleep(0.5)  # what it claimed in the same round trip is in the table by now

        # Then with claim_ahead=0 the other waits in the queue for any idle worker; with Dramatiq's prefetch
        # (twice the threads) this worker holds it too, although it cannot start it yet
        statuses = sorted(job(db, m.message_id)["status"] for m in (first, second))
        if claim_ahead == 0:
            assert statuses == ["pending", "processing"]
        else:
            assert statuses == ["processing", "processing"]
