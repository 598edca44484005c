"""Delivery: Edge Function rows, priority order, delays, and no in-memory delay queue."""

from __future__ import annotations

import time
import uuid
from contextlib import ExitStack
from datetime import timedelta
from types import SimpleNamespace

import jobs.coding as jobs_coding
from broker.broker import SupabaseBroker
from service.settings import load_settings
from tests.support.actors import TableRuns, declare_test_actors
from tests.support.brokers import (
    BrokerFactory,
    Db,
    Settlements,
    insert_job,
    job,
    running_worker,
    wait_for_all,
    wait_for_status,
    wait_until,
)

#: Seconds any single job of these tests may take to be run, from when it is due.
RUN_TIMEOUT_S = 10
#: Milliseconds of delay in the delay test: long enough to see the job not claimed early.
DELAY_MS = 1_500
#: Worker processes' stand-ins in the exactly-once test: a broker, a pool and a Worker each, in this process.
WORKERS = 3
#: Threads of each of those workers.
WORKER_THREADS = 4
#: Jobs in the exactly-once test.
MANY_JOBS = 300
#: Seconds those jobs may take, all together.
MANY_JOBS_TIMEOUT_S = 30


def test_an_edge_function_row_is_completed_by_the_coding_actor(
    broker: SupabaseBroker, db: Db, database_url: str
) -> None:
    # Given the default coding actor, declared as `tasks` declares it
    settings = load_settings(coding_job_duration_ms=0, database_url=database_url)
    jobs_coding.declare_coding_actor(broker, jobs_coding.CodingJob(settings))
    session_id, project_id, user_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    # When the Edge Function inserts a row with only the domain columns
    job_id = insert_job(
        db, session_id=session_id, project_id=project_id, user_id=user_id, prompt="add a button", priority=10
    )

    # Then a worker runs it to completion
    with running_worker(broker, threads=1):
        row = wait_for_status(db, job_id, "completed", RUN_TIMEOUT_S)
    assert row["actor_name"] == jobs_coding.CODING_ACTOR_NAME
    # The prompt is stored once, in its column; the worker hands it to the actor with the other kwargs
    assert row["prompt"] == "add a button"
    assert row["kwargs"] == {
        "session_id": str(session_id),
        "project_id": str(project_id),
        "user_id": str(user_id),
    }
    assert row["retry_count"] == 0
    assert row["error_message"] is None
    assert row["started_at"] is not None
    assert row["completed_at"] >= row["started_at"]


def test_jobs_run_highest_priority_first_then_oldest(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    # Given jobs of mixed priorities, sent one after the other (each its own transaction, so created_at grows)
    sent = [("low-1", 0), ("high-1", 10), ("mid-1", 5), ("low-2", 0), ("high-2", 10), ("mid-2", 5)]
    ids = {key: actors.record.send_with_options(args=(key,), priority=p).message_id for key, p in sent}
    assert {key: job(db, ids[key])["priority"] for key, _ in sent} == dict(sent)

    # When one worker thread runs them
    with running_worker(broker, threads=1):
        wait_for_all(db, ids.values(), "completed", RUN_TIMEOUT_S)

    # Then they ran by priority, then in the order they were sent
    assert actors.runs.keys("record") == ["high-1", "high-2", "mid-1", "mid-2", "low-1", "low-2"]


def test_a_delayed_job_waits_in_its_row_until_due(
    broker: SupabaseBroker, actors: SimpleNamespace, settlements: Settlements, db: Db
) -> None:
    with running_worker(broker, threads=2):
        # Given a delayed job, sent to a running worker, and a job due now sent after it
        sent_at = time.monotonic()
        late = actors.record.send_with_options(args=("late",), delay=DELAY_MS)
        now = actors.record.send("now")

        # Then the row carries the delay as its run time, not as an option
        row = job(db, late.message_id)
        assert row["run_at"] - row["created_at"] == timedelta(milliseconds=DELAY_MS)
        assert "eta" not in row["options"]

        # And the job is not claimed before its run time, while the other one runs at once
        wait_for_status(db, now.message_id, "completed", RUN_TIMEOUT_S)
        time.sleep(max(DELAY_MS / 1000 - 0.5 - (time.monotonic() - sent_at), 0))
        assert job(db, late.message_id)["status"] == "pending"
        assert actors.runs.keys("record") == ["now"]

        # When its time comes, it runs
        wait_for_status(db, late.message_id, "completed", RUN_TIMEOUT_S)

    (run,) = actors.runs.of("record", "ran")[1:]
    assert run.key == "late"
    assert run.at - sent_at >= DELAY_MS / 1000
    # Never through Dramatiq's in-memory delay queue: no eta reached the worker
    assert "eta" not in run.options
    assert settlements.delayed == []


def test_retries_wait_in_their_row_not_in_the_worker(
    broker: SupabaseBroker, actors: SimpleNamespace, settlements: Settlements, db: Db
) -> None:
    # Given a job that fails twice before it succeeds
    message = actors.flaky.send("twice", 2)

    with running_worker(broker, threads=1):
        wait_for_status(db, message.message_id, "completed", RUN_TIMEOUT_S)

    # Then each attempt was a claim of the same row: no eta, no delay queue, the row's retry_count as retries
    attempts = actors.runs.of("flaky", "started")
    assert [run.retries for run in attempts] == [0, 1, 2]
    assert {run.message_id for run in attempts} == {message.message_id}
    assert all("eta" not in run.options for run in attempts)
    assert settlements.delayed == []


def test_a_row_carrying_an_eta_option_still_runs(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    # Given a row written by another producer, with Dramatiq's eta among its options (already due)
    eta_ms = int(time.time() * 1000)
    job_id = insert_job(db, actor_name="record", args=["with-eta"], options={"eta": eta_ms})

    # When a worker takes it, then the actor runs: the job is not completed without having run
    with running_worker(broker, threads=1):
        wait_for_status(db, job_id, "completed", RUN_TIMEOUT_S)
        wait_until(lambda: actors.runs.keys("record") == ["with-eta"], 2, lambda: actors.runs.all())


def test_many_jobs_over_several_workers_each_run_exactly_once(
    make_broker: BrokerFactory, db: Db, database_url: str
) -> None:
    # Given three workers, each with a broker and a connection pool of its own, over one database,
    # recording every run in the database
    runs = TableRuns(database_url)
    brokers = [make_broker(pool_size=WORKER_THREADS + 3) for _ in range(WORKERS)]
    sender = [declare_test_actors(b, runs) for b in brokers].pop().record
    try:
        with ExitStack() as stack:
            for b in brokers:
                stack.enter_context(running_worker(b, threads=WORKER_THREADS))

            # When many jobs arrive while they run
            ids = [sender.send(f"job-{i}").message_id for i in range(MANY_JOBS)]

            # Then every job completes
            rows = wait_for_all(db, ids, "completed", MANY_JOBS_TIMEOUT_S)
    finally:
        runs.close()

    # ... each ran exactly once, and the work was shared
    counts = db.execute(
        "select run_key, count(*) as n from public.test_runs where actor_name = 'record' group by 1"
    ).fetchall()
    assert len(counts) == MANY_JOBS
    assert {row["n"] for row in counts} == {1}
    assert len({row["locked_by"] for row in rows}) > 1
