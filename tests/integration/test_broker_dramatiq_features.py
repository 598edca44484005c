"""Dramatiq features as Dramatiq users expect them: queues, pipelines, groups, callbacks, CurrentMessage."""

from __future__ import annotations

import time
from types import SimpleNamespace

import dramatiq

from broker.broker import SupabaseBroker
from tests.support.actors import OTHER_QUEUE
from tests.support.brokers import (
    Db,
    insert_job,
    job,
    running_worker,
    wait_for_all,
    wait_for_status,
    wait_until,
)

#: Seconds any single job of these tests may take to be run.
RUN_TIMEOUT_S = 10
#: Seconds a job of a queue the worker does not consume is watched for staying put (several poll intervals).
IGNORED_QUEUE_WATCH_S = 1.0


def test_a_worker_consumes_every_declared_queue(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    default = actors.record.send("on default")
    other = actors.record_other.send("on other")
    assert job(db, other.message_id)["queue_name"] == OTHER_QUEUE

    with running_worker(broker, threads=2):
        wait_for_all(db, [default.message_id, other.message_id], "completed", RUN_TIMEOUT_S)

    assert actors.runs.keys("record") == ["on default"]
    assert actors.runs.keys("record_other") == ["on other"]


def test_a_worker_with_queues_consumes_only_those(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    # Given jobs on two queues
    default = actors.record.send("on default")
    other = actors.record_other.send("on other")

    # When a worker runs with --queues other
    with running_worker(broker, threads=2, queues={OTHER_QUEUE}):
        wait_for_status(db, other.message_id, "completed", RUN_TIMEOUT_S)
        time.sleep(IGNORED_QUEUE_WATCH_S)
        # Then the default queue's job was never claimed
        row = job(db, default.message_id)

    assert row["status"] == "pending" and row["locked_by"] is None
    assert actors.runs.keys("record") == []


def test_a_pipeline_runs_in_order_and_passes_results_on(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    pipe = actors.add.message(1, 2) | actors.collect.message("piped")
    pipe.run()

    with running_worker(broker, threads=2):
        wait_until(lambda: actors.runs.of("collect"), RUN_TIMEOUT_S, "the pipeline's second step to run")
        first, second = (m.message_id for m in pipe.messages)
        rows = wait_for_all(db, [first, second], "completed", RUN_TIMEOUT_S)

    (collected,) = actors.runs.of("collect")
    assert collected.value == 3
    assert collected.message_id == second
    # The second step was enqueued only when the first had run
    by_id = {str(row["id"]): row for row in rows}
    assert by_id[second]["created_at"] >= by_id[first]["started_at"]


def test_a_group_runs_every_member(broker: SupabaseBroker, actors: SimpleNamespace, db: Db) -> None:
    children = [actors.record.message(f"member-{i}") for i in range(4)] + [actors.add.message(2, 2)]
    members = dramatiq.group(children)  # type: ignore[no-untyped-call]
    members.run()  # type: ignore[no-untyped-call]

    with running_worker(broker, threads=2):
        wait_for_all(db, [m.message_id for m in members.children], "completed", RUN_TIMEOUT_S)

    assert sorted(actors.runs.keys("record")) == [f"member-{i}" for i in range(4)]
    assert actors.runs.keys("add") == ["2+2"]


def test_on_success_and_on_failure_callbacks_run(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    ok = actors.add.send_with_options(args=(20, 22), on_success=actors.succeeded)
    bad = actors.fail_always.send_with_options(args=("cb",), max_retries=0, on_failure=actors.failed)

    with running_worker(broker, threads=2):
        wait_until(
            lambda: actors.runs.of("succeeded") and actors.runs.of("failed"),
            RUN_TIMEOUT_S,
            lambda: f"both callbacks to run; runs so far: {actors.runs.all()}",
        )
        wait_for_status(db, bad.message_id, "failed", RUN_TIMEOUT_S)

    (success,) = actors.runs.of("succeeded")
    assert success.key == ok.message_id and success.value == 42
    (failure,) = actors.runs.of("failed")
    assert failure.key == bad.message_id
    assert failure.value == {"type": "RuntimeError", "message": "boom cb"}


def test_current_message_is_the_row(broker: SupabaseBroker, actors: SimpleNamespace, db: Db) -> None:
    # Given a message sent from Python and a row inserted with plain SQL, with no Python producer
    sent = actors.record.send("sent")
    inserted = insert_job(db, actor_name="record", args=["inserted"])

    with running_worker(broker, threads=1):
        wait_for_all(db, [sent.message_id, inserted], "completed", RUN_TIMEOUT_S)

    # Then inside the actor, CurrentMessage's message_id is the row's id
    ids = {run.key: run.message_id for run in actors.runs.of("record")}
    assert ids == {"sent": sent.message_id, "inserted": inserted}
