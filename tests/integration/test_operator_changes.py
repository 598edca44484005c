"""The operator's changes (issue 8): pause and resume, retention, retries chosen by filters (with a dry run),
over both transports where they go through one."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import psycopg
import pytest

from broker.broker import SupabaseBroker
from broker.errors import QueueError
from broker.operator_records import JobFilter
from broker.retention import Pruner
from broker.transport import Transport
from tests.support.brokers import Db, insert_job, job, jobs, running_worker, wait_for_status, wait_until

#: Seconds any wait of these tests may take.
TIMEOUT_S = 10
#: Milliseconds in a day.
DAY_MS = 86_400_000


def finish(db: Db, job_id: str, status: str, days_ago: float) -> None:
    """Make a job finished `days_ago` (as if it ran then)."""
    db.execute(
        "update public.coding_jobs set status = %s::public.job_status,"
        " completed_at = now() - %s * interval '1 day' where id = %s",
        (status, days_ago, job_id),
    )


# -- pause and resume --------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport_kind", ["postgres"], indirect=True)
def test_a_paused_queue_is_skipped_by_claims_until_it_is_resumed(
    broker: SupabaseBroker, actors: Any, db: Db, transport: Transport
) -> None:
    # Given the default queue paused, and a worker running over both queues
    paused = transport.pause_queue("default", "maintenance")
    assert (paused.queue_name, paused.reason) == ("default", "maintenance")
    held = actors.record.send("held back")
    with running_worker(broker, threads=1):
        # When jobs arrive in both queues
        other = actors.record_other.send("other")
        # Then the other queue runs, and the paused one does not, poll after poll
        wait_for_status(db, other.message_id, "completed", TIMEOUT_S)
        second = actors.record_other.send("other again")
        wait_for_status(db, second.message_id, "completed", TIMEOUT_S)
        assert job(db, held.message_id)["status"] == "pending"
        assert [p.queue_name for p in transport.paused_queues()] == ["default"]

        # When it is resumed, the doorbell wakes the worker and the job runs
        assert transport.resume_queue("default") is True
        wait_for_status(db, held.message_id, "completed", TIMEOUT_S)
    assert transport.paused_queues() == []
    assert transport.resume_queue("default") is False


def test_claims_of_every_kind_skip_a_paused_queue(db: Db) -> None:
    db.execute("select public.register_worker('w1', 'heartbeat', 600000)")
    insert_job(db, prompt="paused")
    db.execute("select * from public.pause_queue('default')")
    token = str(uuid.uuid4())

    assert (
        db.execute(
            "select * from public.claim_jobs('w1', 'default', 5, 60000, %s::uuid)", (token,)
        ).fetchall()
        == []
    )
    assert db.execute("select * from public.claim_jobs('old', 'default', 5)").fetchall() == []
    assert db.execute("select * from public.claim_next_job()").fetchall() == []

    db.execute("select * from public.resume_queue('default')")
    assert len(db.execute("select * from public.claim_next_job()").fetchall()) == 1


# -- retention ---------------------------------------------------------------------------------------------
def test_prune_deletes_finished_jobs_past_their_age_in_batches(db: Db, transport: Transport) -> None:
    # Given finished jobs of each kind, some old and some recent, and a pending one that is older still
    ids = {
        name: insert_job(db, prompt=name) for name in ("old done", "new done", "old cancelled", "old failed")
    }
    ids["older failed"] = insert_job(db, prompt="older failed")
    ids["waiting"] = insert_job(db, prompt="waiting")
    finish(db, ids["old done"], "completed", 8)
    finish(db, ids["new done"], "completed", 1)
    finish(db, ids["old cancelled"], "cancelled", 8)
    finish(db, ids["old failed"], "failed", 8)
    finish(db, ids["older failed"], "failed", 31)
    db.execute(
        "update public.coding_jobs set created_at = now() - interval '60 days' where id = %s",
        (ids["waiting"],),
    )

    # When the retention keeps completed and cancelled jobs 7 days and failed ones 30, two rows per batch
    result = transport.prune(7 * DAY_MS, 30 * DAY_MS, batch=2, max_batches=1)
    again = transport.prune(7 * DAY_MS, 30 * DAY_MS, batch=2, max_batches=1)
    last = transport.prune(7 * DAY_MS, 30 * DAY_MS, batch=2, max_batches=1)

    # Then only the finished jobs past their age went, a batch at a time, and the counts followed
    assert (result.deleted, result.more) == (2, True)
    assert (again.deleted, again.more) == (1, False)
    assert (last.deleted, last.more) == (0, False)
    left = {row["prompt"] for row in jobs(db)}
    assert left == {"new done", "old failed", "waiting"}
    counted = db.execute("select coalesce(sum(jobs), 0) as n from public.get_queue_stats()").fetchone()
    assert counted == {"n": 3}
    # and None keeps a kind forever
    assert transport.prune(None, None).deleted == 0


def test_one_pruner_at_a_time_and_claims_never_wait_for_it(database_url: str, db: Db) -> None:
    # Given many old completed jobs and some pending ones
    db.execute(
        "insert into public.coding_jobs (prompt, status, completed_at)"
        " select 'old', 'completed', now() - interval '10 days' from generate_series(1, 300)"
    )
    for _ in range(3):
        insert_job(db, prompt="to claim")
    db.execute("select public.register_worker('w1', 'heartbeat', 600000)")

    # When one pruner is in the middle of its transaction (its deletes not committed yet)
    with psycopg.connect(database_url) as pruner:
        deleted = pruner.execute("select deleted from public.prune_jobs(%s, null, 100, 2)", (7 * DAY_MS,))
        assert deleted.fetchone() == (200,)

        # Then a second pruner returns at once with nothing, and a claim goes through without waiting
        with psycopg.connect(database_url, autocommit=True, options="-c lock_timeout=2000") as other:
            started = time.monotonic()
            assert other.execute(
                "select deleted, more from public.prune_jobs(%s, null)", (7 * DAY_MS,)
            ).fetchone() == (
                0,
                False,
            )
            claimed = other.execute(
                "select id from public.claim_jobs('w1', 'default', 5, 60000, %s::uuid)", (str(uuid.uuid4()),)
            ).fetchall()
            assert len(claimed) == 3
            assert time.monotonic() - started < 1.0
        pruner.commit()
    assert db.execute(
        "select count(*) as n from public.coding_jobs where status = 'completed'"
    ).fetchone() == {"n": 100}


def test_a_worker_prunes_old_jobs_on_its_own(db: Db, transport: Transport) -> None:
    # Given old completed jobs and a worker's retention thread that keeps them a day
    old = [insert_job(db, prompt=f"old {i}") for i in range(3)]
    for job_id in old:
        finish(db, job_id, "completed", 2)
    recent = insert_job(db, prompt="recent")
    finish(db, recent, "completed", 0)
    pruner = Pruner(transport, completed_ms=DAY_MS, failed_ms=None, first_after_s=0.01)

    # When it runs
    pruner.start()
    try:
        wait_until(lambda: len(jobs(db)) == 1, TIMEOUT_S, lambda: f"old jobs pruned; left {len(jobs(db))}")
    finally:
        pruner.stop()

    # Then the old ones are gone and the recent one stays
    assert [row["prompt"] for row in jobs(db)] == ["recent"]
    assert pruner.status().alive is False and pruner.status().restarts == 0


# -- retries by filter, and lists --------------------------------------------------------------------------
def failed_jobs(db: Db) -> dict[str, str]:
    made = {
        "timeout": insert_job(db, prompt="a", actor_name="fetch", queue_name="web"),
        "boom": insert_job(db, prompt="b", actor_name="fetch", queue_name="web"),
        "other": insert_job(db, prompt="c", actor_name="render", queue_name="default"),
    }
    for error, job_id in made.items():
        finish(db, job_id, "failed", 0)
        db.execute(
            "update public.coding_jobs set error_message = %s, retry_count = 3 where id = %s",
            (f"RuntimeError: {error.upper()} while working", job_id),
        )
    return made


def test_failed_jobs_are_retried_by_filter_and_a_dry_run_changes_nothing(
    db: Db, transport: Transport
) -> None:
    made = failed_jobs(db)

    # A dry run by error text (any case) says what it would retry and changes nothing
    would = transport.retry_jobs(JobFilter(error="timeout"), dry_run=True)
    assert [j.id for j in would] == [made["timeout"]]
    assert job(db, made["timeout"])["status"] == "failed"

    # Retrying by queue and actor puts those back with a fresh retry budget, their attempts kept
    done = transport.retry_jobs(JobFilter(queue_name="web", actor_name="fetch"))
    assert {j.id for j in done} == {made["timeout"], made["boom"]}
    row = job(db, made["boom"])
    assert (row["status"], row["retry_count"], row["completed_at"]) == ("pending", 0, None)
    assert job(db, made["other"])["status"] == "failed"

    # By id; and with no filter at all, only with `every`
    with pytest.raises(QueueError, match="needs ids, a queue"):
        transport.retry_jobs(JobFilter())
    assert [j.id for j in transport.retry_jobs(JobFilter(), every=True, dry_run=True)] == [made["other"]]
    assert [j.id for j in transport.retry_jobs(JobFilter(job_ids=(made["other"],)))] == [made["other"]]


def test_jobs_are_listed_by_status_queue_actor_error_and_user(db: Db, transport: Transport) -> None:
    made = failed_jobs(db)
    user = uuid.uuid4()
    mine = insert_job(db, prompt="x" * 500, user_id=user)

    assert {j.id for j in transport.list_jobs(JobFilter(status="failed", queue_name="web"))} == {
        made["timeout"],
        made["boom"],
    }
    assert [j.id for j in transport.list_jobs(JobFilter(actor_name="render"))] == [made["other"]]
    assert [j.id for j in transport.list_jobs(JobFilter(error="BOOM"))] == [made["boom"]]
    [listed] = transport.list_jobs(JobFilter(user_id=str(user)))
    assert listed.id == mine and listed.status == "pending"
    assert listed.prompt is not None and len(listed.prompt) == 120  # an excerpt, never the whole prompt
    assert len(transport.list_jobs(limit=2)) == 2
    detail = transport.get_job(mine)
    assert detail is not None and detail.prompt_length == 500 and detail.prompt is not None
    assert len(detail.prompt) == 200
    assert transport.get_job(str(uuid.uuid4())) is None
    assert json.dumps([j.id for j in transport.list_jobs(JobFilter(status="cancelled"))]) == "[]"
