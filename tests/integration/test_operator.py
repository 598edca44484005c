"""The operator's functions (issue 8): attempt history, exact counts, pause and resume, retention, and the
list/retry calls, over both transports where they go through one."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from broker.broker import SupabaseBroker
from broker.operator_records import ATTEMPTS_KEPT, JobFilter
from broker.transport import Transport
from tests.support.brokers import Db, insert_job, job, running_worker, wait_for_status, wait_until

#: Seconds any wait of these tests may take.
TIMEOUT_S = 10
#: The counts every status change keeps must equal these, counted the slow way.
COUNT_BY_SCAN = """
select queue_name, actor_name, status::text as status, count(*) as jobs
  from public.coding_jobs group by 1, 2, 3"""


def register(db: Db, worker_id: str = "w1") -> str:
    db.execute("select public.register_worker(%s, 'heartbeat', 600000)", (worker_id,))
    return worker_id


def claim(db: Db, worker_id: str, queue: str = "default", limit: int = 10) -> list[dict[str, Any]]:
    return db.execute(
        "select id, claim_token from public.claim_jobs(%s, %s, %s, 60000, %s::uuid)",
        (worker_id, queue, limit, str(uuid.uuid4())),
    ).fetchall()


def counts_by_scan(db: Db) -> dict[tuple[str, str, str], int]:
    return {
        (r["queue_name"], r["actor_name"], r["status"]): int(r["jobs"]) for r in db.execute(COUNT_BY_SCAN)
    }


def counts_kept(db: Db) -> dict[tuple[str, str, str], int]:
    rows = db.execute("select * from public.get_actor_stats()").fetchall()
    return {(r["queue_name"], r["actor_name"], str(r["status"])): int(r["jobs"]) for r in rows if r["jobs"]}


# -- attempts ----------------------------------------------------------------------------------------------
def test_every_attempt_is_kept_with_its_worker_outcome_and_error(
    broker: SupabaseBroker, actors: Any, db: Db, transport: Transport
) -> None:
    # Given a job that fails twice and then succeeds
    message = actors.flaky.send("twice", 2)

    # When a worker runs it to the end
    with running_worker(broker, threads=1):
        wait_for_status(db, message.message_id, "completed", TIMEOUT_S)

    # Then its history shows three attempts on this worker: two failures with their errors, then the success
    detail = transport.get_job(message.message_id)
    assert detail is not None
    assert [(a.attempt, a.outcome, a.worker) for a in detail.attempts] == [
        (1, "failed", broker.worker_id),
        (2, "failed", broker.worker_id),
        (3, "completed", broker.worker_id),
    ]
    assert "RuntimeError: flaky twice failed attempt 1" in (detail.attempts[0].error or "")
    assert "attempt 2" in (detail.attempts[1].error or "")
    assert all(a.started_at and a.ended_at and a.started_at <= a.ended_at for a in detail.attempts)
    [listed] = transport.list_jobs(JobFilter(status="completed", actor_name="flaky"))
    assert listed.id == message.message_id and listed.attempts == 3


def test_only_the_last_attempts_are_kept(db: Db) -> None:
    # Given a job that has been claimed and retried more often than the history keeps
    worker = register(db)
    job_id = insert_job(db, prompt="again and again", max_retries=100)
    for attempt in range(1, ATTEMPTS_KEPT + 6):
        [claimed] = claim(db, worker)
        params = (claimed["id"], claimed["claim_token"], f"error {attempt}")
        db.execute("select public.retry_job(%s, %s, 0, %s)", params)

    # Then it keeps the last ATTEMPTS_KEPT, numbered on from the first
    attempts = job(db, job_id)["attempts"]
    assert len(attempts) == ATTEMPTS_KEPT
    assert [a["attempt"] for a in attempts] == list(range(6, ATTEMPTS_KEPT + 6))
    assert attempts[-1]["error"] == f"error {ATTEMPTS_KEPT + 5}"


def test_a_rescue_is_an_attempt_lost_and_a_cancelled_job_is_not_rescued_into_the_queue(
    database_url: str, db: Db
) -> None:
    # Given two jobs claimed by a worker whose session then dies; one of them was asked to cancel meanwhile
    kept, cancelled = insert_job(db, prompt="keep"), insert_job(db, prompt="stop")
    session = psycopg.connect(database_url, autocommit=True)
    session.execute("select public.register_worker('doomed', 'lock', 60000)")
    claim(db, "doomed")
    assert db.execute("select * from public.cancel_jobs(array[%s]::uuid[])", (cancelled,)).fetchone() == {
        "id": uuid.UUID(cancelled),
        "outcome": "cancelling",
    }
    session.close()

    # When the rescue finds them
    wait_until(
        lambda: db.execute("select public.rescue_jobs()").fetchone() and job(db, kept)["status"] == "pending",
        TIMEOUT_S,
        "the dead worker's jobs to be rescued",
    )

    # Then one goes back to the queue with a lost attempt; the other ends cancelled instead of running again
    assert [(a["outcome"], a["worker"]) for a in job(db, kept)["attempts"]] == [("lost", "doomed")]
    row = job(db, cancelled)
    assert row["status"] == "cancelled" and row["completed_at"] is not None
    assert [a["outcome"] for a in row["attempts"]] == ["cancelled"]


# -- counts ------------------------------------------------------------------------------------------------
def test_the_kept_counts_equal_a_full_count_after_every_kind_of_change(db: Db) -> None:
    # Given jobs inserted (INSERT, enqueue_jobs), claimed, completed, retried, dead-lettered and cancelled
    worker = register(db)
    for _ in range(5):
        insert_job(db, prompt="edge")
    insert_job(db, prompt="other queue", queue_name="other", actor_name="other_actor")
    db.execute(
        "select public.enqueue_jobs(%s::jsonb)",
        ('[{"actor_name": "noop"}, {"actor_name": "noop", "queue_name": "default"}]',),
    )
    claimed = claim(db, worker, limit=4)
    db.execute(
        "select public.complete_jobs(%s::uuid[], %s::uuid[])",
        ([c["id"] for c in claimed[:2]], [c["claim_token"] for c in claimed[:2]]),
    )
    db.execute("select public.retry_job(%s, %s, 0, 'again')", (claimed[2]["id"], claimed[2]["claim_token"]))
    db.execute("select public.dead_letter_job(%s, %s, 'dead')", (claimed[3]["id"], claimed[3]["claim_token"]))
    pending = db.execute("select id from public.coding_jobs where status = 'pending' limit 1").fetchone()
    assert pending is not None
    db.execute("select * from public.cancel_jobs(array[%s]::uuid[])", (pending["id"],))
    assert counts_kept(db) == counts_by_scan(db)

    # When an operator changes rows by hand (an actor renamed, a row deleted) and the counts are folded
    db.execute("update public.coding_jobs set actor_name = 'renamed' where status = 'pending'")
    db.execute("delete from public.coding_jobs where id = %s", (claimed[0]["id"],))
    assert counts_kept(db) == counts_by_scan(db)
    folded = db.execute("select public.queue_compact_stats() as folded").fetchone()
    assert folded is not None and folded["folded"] > 0
    assert db.execute("select count(*) as n from public.queue_stat_deltas").fetchone() == {"n": 0}

    # Then the counts still equal a full count, by queue and status too, and a truncate empties them
    assert counts_kept(db) == counts_by_scan(db)
    stats = {
        (r["queue_name"], str(r["status"])): r["jobs"] for r in db.execute("select * from get_queue_stats()")
    }
    by_queue: dict[tuple[str, str], int] = {}
    for (queue, _, status), jobs in counts_by_scan(db).items():
        by_queue[queue, status] = by_queue.get((queue, status), 0) + jobs
    assert stats == by_queue
    db.execute("truncate public.coding_jobs")
    assert counts_kept(db) == {}
    assert db.execute("select count(*) as n from public.get_queue_stats()").fetchone() == {"n": 0}


def test_the_oldest_wait_ignores_jobs_delayed_into_the_future(db: Db) -> None:
    # Given a job that fell due 5 minutes ago (created an hour ago), and one delayed for another hour
    due = insert_job(db, prompt="due")
    later = insert_job(db, prompt="later", queue_name="later")
    db.execute(
        "update public.coding_jobs set created_at = now() - interval '1 hour',"
        " run_at = now() - interval '5 minutes' where id = %s",
        (due,),
    )
    db.execute(
        "update public.coding_jobs set created_at = now() - interval '2 hours',"
        " run_at = now() + interval '1 hour' where id = %s",
        (later,),
    )

    # When the stats are read
    rows = {
        r["queue_name"]: r
        for r in db.execute("select * from public.get_queue_stats() where status = 'pending'")
    }
    waited = db.execute(
        "select extract(epoch from now() - %s::timestamptz) as s", (rows["default"]["oldest_due_at"],)
    ).fetchone()

    # Then the due job has waited since it fell due; the delayed one does not wait at all
    assert waited is not None and 299 <= float(waited["s"]) < 330
    assert rows["later"]["oldest_due_at"] is None and rows["later"]["oldest_created_at"] is not None
