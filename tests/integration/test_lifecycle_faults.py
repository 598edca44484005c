"""The job lifecycle under faults, over both transports where it applies (issue 7's findings, one test each).

Each test injects a real fault (text the database refuses, a killed connection, a frozen flush, a session that
dies, a silent socket) and checks the row's end state and that the worker keeps working.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from types import SimpleNamespace
from typing import Any

import dramatiq
import psycopg
import pytest

from broker.broker import SupabaseBroker
from broker.listen import ListenDoorbell
from broker.postgres import PostgresTransport
from tests.support.actors import declare_test_actors
from tests.support.brokers import (
    Db,
    build_broker,
    insert_job,
    job,
    running_worker,
    wait_for_all,
    wait_for_status,
    wait_until,
)
from tests.support.tcp_proxy import running_proxy

#: Seconds any wait of these tests may take.
TIMEOUT_S = 10
#: Milliseconds of a short lease: extended every 400 ms, so a slow flush outlives it several times over.
SHORT_LEASE_MS = 1_200


def keeps_working(broker: SupabaseBroker, db: Db) -> None:
    """A fresh job still runs to completion on this worker."""
    actors = declare_test_actors(broker) if "record" not in broker.actors else None
    record = broker.get_actor("record") if actors is None else actors.record
    message = record.send(f"after-{uuid.uuid4().hex[:6]}")
    wait_for_status(db, message.message_id, "completed", TIMEOUT_S)


# -- 1. error text the database refuses ------------------------------------------------------------------
@pytest.mark.parametrize("text", ["a NUL \x00 byte", "a lone \ud800 surrogate"], ids=["nul", "surrogate"])
def test_an_error_whose_text_the_database_refuses_still_settles_its_job(
    broker: SupabaseBroker, db: Db, text: str
) -> None:
    # Given an actor whose failure's text holds what PostgreSQL (or JSON) refuses, as sandbox output does
    @dramatiq.actor(broker=broker, max_retries=1, min_backoff=10, max_backoff=10)
    def sandbox() -> None:
        raise RuntimeError(f"sandbox said: {text}")

    message = sandbox.send()

    # When it runs, is retried once and fails again
    with running_worker(broker, threads=1):
        row = wait_for_status(db, message.message_id, "failed", TIMEOUT_S)
        # Then the worker was never wedged: it keeps taking jobs
        keeps_working(broker, db)

    # And the row keeps the error, made storable
    assert row["retry_count"] == 1
    assert "RuntimeError: sandbox said: a " in row["error_message"] and "\x00" not in row["error_message"]


# -- 4. an ack keeps its lease until it commits ------------------------------------------------------------
class HeldCompletions(PostgresTransport):
    """The direct transport, whose completions wait until the test lets them through (a slow flush)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, pool_size=4)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def complete_many(self, claims: Any) -> set[str]:
        self.waiting.set()
        self.gate.wait(TIMEOUT_S)
        return super().complete_many(claims)


def test_an_acked_job_keeps_its_lease_until_its_completion_commits(database_url: str, db: Db) -> None:
    # Given a worker with a short lease, whose completions are held back
    transport = HeldCompletions(database_url)
    broker = build_broker(transport, lease_ms=SHORT_LEASE_MS)
    actors = declare_test_actors(broker)
    try:
        message = actors.record.send("acked")
        with running_worker(broker, threads=1):
            # When the job has run and its ack waits for the flush, for several leases' worth of time
            assert transport.waiting.wait(TIMEOUT_S)
            first = job(db, message.message_id)["lease_expires_at"]
            wait_until(
                lambda: job(db, message.message_id)["lease_expires_at"] > first,
                TIMEOUT_S,
                "the lease of the acked job to be extended",
            )
            time.sleep(3 * SHORT_LEASE_MS / 1000)  # several leases long: what the old lease would not survive
            # Then the job was never rescued or run again while its completion was on its way
            assert job(db, message.message_id)["status"] == "processing"
            transport.gate.set()
            row = wait_for_status(db, message.message_id, "completed", TIMEOUT_S)
    finally:
        transport.gate.set()
        broker.close()
    assert actors.runs.keys("record") == ["acked"]
    assert (row["retry_count"], row["rescue_count"]) == (0, 0)


# -- 6. rescues do not spend retries; a dead session is noticed in seconds ----------------------------------
def test_a_dead_workers_job_is_rescued_in_seconds_without_spending_its_retries(
    database_url: str, db: Db
) -> None:
    # Given a job with no retries left, claimed by a worker whose registration lives on its own session
    job_id = insert_job(db, prompt="never failed", max_retries=0)
    worker_id = f"doomed:{uuid.uuid4().hex[:6]}"
    session = psycopg.connect(database_url, autocommit=True)
    session.execute("select public.register_worker(%s, 'lock', 60000)", (worker_id,))
    token = str(uuid.uuid4())
    [claimed] = db.execute(
        "select id from public.claim_jobs(%s, 'default', 1, 600000, %s::uuid)", (worker_id, token)
    ).fetchall()
    assert str(claimed["id"]) == job_id

    # When its session dies (the process was OOM-killed), long before its ten-minute lease would end
    session.close()

    # Then the rescue (which any worker's heartbeat runs) returns it within seconds, counting a rescue only
    def rescued() -> dict[str, Any] | None:
        db.execute("select public.rescue_jobs()")
        row = job(db, job_id)
        return row if row["status"] == "pending" else None

    row = wait_until(rescued, TIMEOUT_S, "the dead worker's job to be rescued")
    assert (row["retry_count"], row["rescue_count"], row["claim_token"]) == (0, 1, None)
    assert f"worker {worker_id} died" in row["error_message"]
    assert db.execute("select count(*) as n from public.queue_workers").fetchone() == {"n": 0}


def test_a_heartbeat_worker_that_goes_silent_is_rescued_after_its_stale_window(db: Db) -> None:
    # Given a job held by a worker that heartbeats (a transaction pooler, the REST API), silent after 0.5 s
    job_id = insert_job(db, prompt="silent")
    db.execute("select public.register_worker('quiet', 'heartbeat', 500)")
    db.execute(
        "select id from public.claim_jobs('quiet', 'default', 1, 600000, %s::uuid)", (str(uuid.uuid4()),)
    )
    # A heartbeat keeps it: the job stays held
    db.execute("select * from public.worker_heartbeat('quiet', '{}', '{}')")
    assert job(db, job_id)["status"] == "processing"

    # When it stops heartbeating, then once its window has passed the rescue returns the job
    def rescued() -> dict[str, Any] | None:
        db.execute("select public.rescue_jobs()")
        row = job(db, job_id)
        return row if row["status"] == "pending" else None

    row = wait_until(rescued, TIMEOUT_S, "the silent worker's job to be rescued")
    assert (row["retry_count"], row["rescue_count"]) == (0, 1)


def test_a_worker_that_reconnects_within_the_grace_keeps_its_jobs(database_url: str, db: Db) -> None:
    # Given a job held by a registered worker
    job_id = insert_job(db, prompt="kept")
    worker_id = f"blip:{uuid.uuid4().hex[:6]}"
    first = psycopg.connect(database_url, autocommit=True)
    first.execute("select public.register_worker(%s, 'lock', 60000)", (worker_id,))
    db.execute(
        "select id from public.claim_jobs(%s, 'default', 1, 600000, %s::uuid)", (worker_id, str(uuid.uuid4()))
    )

    # When its session drops and a rescue notices, but it registers again on a new session at once
    first.close()
    db.execute("select public.rescue_jobs()")
    with psycopg.connect(database_url, autocommit=True) as second:
        second.execute("select public.register_worker(%s, 'lock', 60000)", (worker_id,))
        time.sleep(2.5)  # past the rescue's 2 s grace: only the new lock can keep the job
        db.execute("select public.rescue_jobs()")

        # Then its job is still its own
        row = job(db, job_id)
        assert (row["status"], row["locked_by"], row["rescue_count"]) == ("processing", worker_id, 0)


# -- 7. supervised background threads ----------------------------------------------------------------------
class FailingOnce(PostgresTransport):
    """The direct transport, whose named method raises an unexpected error once (a bug, not an outage)."""

    def __init__(self, url: str, method: str) -> None:
        super().__init__(url, pool_size=4)
        self.method = method
        self.failed = threading.Event()

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if (
            name == object.__getattribute__(self, "method")
            and not object.__getattribute__(self, "failed").is_set()
        ):
            failed = object.__getattribute__(self, "failed")

            def fail_once(*args: Any, **kwargs: Any) -> Any:
                failed.set()
                raise RuntimeError(f"unexpected failure in {name}")

            return fail_once
        return attribute


@pytest.mark.parametrize("method", ["heartbeat", "complete_many"])
def test_a_background_thread_that_fails_is_restarted_and_the_worker_goes_on(
    database_url: str, db: Db, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    transport = FailingOnce(database_url, method)
    broker = build_broker(transport, lease_ms=SHORT_LEASE_MS)
    actors = declare_test_actors(broker)
    try:
        with running_worker(broker, threads=1):
            first = actors.record.send("first")
            assert transport.failed.wait(TIMEOUT_S)
            # Then the failure was logged with its traceback, and the thread runs again: jobs keep completing
            # and the worker keeps its registration fresh
            later = [actors.record.send(f"later-{i}") for i in range(3)]
            wait_for_all(db, [m.message_id for m in later], "completed", TIMEOUT_S)
            beat = db.execute("select heartbeat_at from public.queue_workers").fetchone()
            assert beat is not None
            wait_until(
                lambda: db.execute("select heartbeat_at from public.queue_workers").fetchone() != beat,
                TIMEOUT_S,
                "another heartbeat",
            )
            # A job whose completion failed unexpectedly comes back (let go, never stranded)
            assert job(db, first.message_id)["status"] in ("completed", "processing", "pending")
        statuses = {s.name: s for s in broker.background_threads()}
    finally:
        broker.close()
    thread = "queue-heartbeat" if method == "heartbeat" else "queue-acks"
    if method == "heartbeat":
        assert statuses[thread].restarts == 1 and "unexpected failure" in (statuses[thread].last_error or "")
    assert any("unexpected failure" in (r.exc_text or "") + r.getMessage() for r in caplog.records)


# -- 8. the fence has no holes -------------------------------------------------------------------------------
def test_no_settling_function_settles_a_held_job_without_its_claim_token(database_url: str, db: Db) -> None:
    # Given a job a worker holds
    job_id = insert_job(db, prompt="held")
    worker_id = f"holder:{uuid.uuid4().hex[:6]}"
    with psycopg.connect(database_url, autocommit=True) as session:
        session.execute("select public.register_worker(%s, 'lock', 60000)", (worker_id,))
        db.execute(
            "select id from public.claim_jobs(%s, 'default', 1, 60000, %s::uuid)",
            (worker_id, str(uuid.uuid4())),
        )

        # Then none of the seed's settling functions changes it without the claim's token
        assert db.execute("select public.complete_job(%s) as r", (job_id,)).fetchone() == {"r": False}
        assert db.execute("select public.fail_job(%s, 'x') as r", (job_id,)).fetchone() == {"r": None}
        assert db.execute("select public.retry_job(%s, null, 0, 'x') as r", (job_id,)).fetchone() == {
            "r": False
        }
        assert db.execute("select public.dead_letter_job(%s, null, 'x') as r", (job_id,)).fetchone() == {
            "r": False
        }
        assert db.execute("select public.postpone_job(%s, null, 0, 'x') as r", (job_id,)).fetchone() == {
            "r": False
        }
        assert job(db, job_id)["status"] == "processing"


def test_the_seed_functions_still_serve_a_caller_that_claimed_through_claim_next_job(db: Db) -> None:
    done, failing = insert_job(db, prompt="one", priority=10), insert_job(db, prompt="two")
    [first] = db.execute("select * from public.claim_next_job()").fetchall()
    assert str(first["id"]) == done
    assert db.execute("select public.complete_job(%s) as r", (done,)).fetchone() == {"r": True}
    [second] = db.execute("select * from public.claim_next_job()").fetchall()
    assert db.execute("select public.fail_job(%s, 'boom') as r", (failing,)).fetchone() == {"r": "pending"}
    assert (job(db, done)["status"], job(db, failing)["retry_count"]) == ("completed", 1)
    assert str(second["id"]) == failing


# -- 9. a LISTEN connection that died silently --------------------------------------------------------------
def test_a_silently_dead_listen_connection_is_noticed_logged_and_replaced(
    database_url: str, db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    host, port = str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)
    if host.startswith("/"):
        pytest.skip("the embedded server listens on a unix socket only; the proxy needs TCP")
    with running_proxy(host, port) as proxy:
        proxied = psycopg.conninfo.make_conninfo(database_url, host="127.0.0.1", port=str(proxy.port))
        rings: list[str | None] = []
        heard = threading.Event()

        def ring(queue: str | None, run_at_ms: int) -> None:
            rings.append(queue)
            if queue == "probe-test":
                heard.set()

        def probe(token: str) -> None:
            db.execute("select public.queue_probe_doorbell(%s)", (token,))

        bell = ListenDoorbell(proxied, probe=probe, probe_every_s=0.3, probe_timeout_s=0.5)
        bell.start(ring)
        try:
            wait_until(lambda: rings, TIMEOUT_S, "the doorbell's first look")
            # When every open connection through the proxy goes silent, with no FIN and no reset
            proxy.freeze()
            # Then the doorbell notices within its probe's deadline, says so, and reconnects
            wait_until(
                lambda: any("LISTEN connection lost" in r.getMessage() for r in caplog.records),
                TIMEOUT_S,
                "a log line saying the LISTEN connection was lost",
            )
            wait_until(
                lambda: any("re-established" in r.getMessage() for r in caplog.records),
                TIMEOUT_S,
                "a log line saying it was re-established",
            )
            # And a ring reaches it again
            db.execute(
                "select pg_notify('coding_jobs', json_build_object('queue', 'probe-test', 'run_at', 0)::text)"
            )
            assert heard.wait(TIMEOUT_S)
        finally:
            bell.stop()


# -- 10. a dropped connection is routine ---------------------------------------------------------------------
def test_killed_connections_pause_nothing_and_log_no_critical_line(
    database_url: str, db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    transport = PostgresTransport(database_url, pool_size=4)
    broker = build_broker(transport, poll_interval_ms=200)
    actors = declare_test_actors(broker)
    caplog.set_level(logging.INFO)
    try:
        with running_worker(broker, threads=2):
            keeps_working(broker, db)
            # When every connection of the worker is killed, again and again, while jobs keep coming
            sent = []
            for round_ in range(5):
                db.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity"
                    " where datname = current_database() and application_name like 'queue-worker%%'"
                )
                sent += [actors.record.send(f"r{round_}-{i}").message_id for i in range(4)]
            # Then every job completes, no consumer was restarted, and nothing was logged as CRITICAL
            wait_for_all(db, sent, "completed", TIMEOUT_S)
    finally:
        broker.close()
    critical = [r.getMessage() for r in caplog.records if r.levelno >= logging.CRITICAL]
    assert critical == []
    assert not any("Restarting consumer" in r.getMessage() for r in caplog.records)


def test_a_send_on_a_connection_the_server_dropped_is_retried_once(database_url: str, db: Db) -> None:
    transport = PostgresTransport(database_url, pool_size=1)
    broker = build_broker(transport)
    actors = declare_test_actors(broker)
    try:
        actors.record.send("first")
        # When the server drops the producer's pooled connection
        db.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where datname = current_database() and application_name = 'queue-worker'"
        )
        # Then the next send goes through (the message id makes a repeat harmless)
        second = actors.record.send("second")
    finally:
        broker.close()
    assert job(db, second.message_id)["status"] == "pending"


# -- 11. rows the Edge Function inserts wrongly --------------------------------------------------------------
@pytest.mark.parametrize(
    ("columns", "reason"),
    [
        ({"prompt": None}, "prompt: missing"),
        ({"prompt": "   "}, "prompt: empty"),
        ({"prompt": "ok", "options": {"time_limit": "abc"}}, "options.time_limit must be a positive number"),
        ({"prompt": "ok", "options": {"max_age": True}}, "options.max_age must be a positive number"),
    ],
    ids=["null-prompt", "empty-prompt", "time-limit-text", "max-age-bool"],
)
def test_a_bad_row_fails_with_a_message_naming_what_is_wrong(
    broker: SupabaseBroker, db: Db, columns: dict[str, Any], reason: str
) -> None:
    from jobs.coding import CodingJob, declare_coding_actor
    from service.settings import load_settings

    declare_coding_actor(broker, CodingJob(load_settings(coding_job_duration_ms=0)))
    job_id = insert_job(db, **columns)
    with running_worker(broker, threads=1):
        row = wait_for_status(db, job_id, "failed", TIMEOUT_S)
    assert reason in row["error_message"]
    assert row["retry_count"] == 0


def test_a_priority_outside_the_plan_tiers_is_refused_with_a_clear_error(
    broker: SupabaseBroker, actors: SimpleNamespace, db: Db
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="coding_jobs_priority_check"):
        insert_job(db, prompt="jump the queue", priority=2**31 - 1)
    with pytest.raises(ValueError, match="priority must be an integer from 0 to 10"):
        actors.record.send_with_options(args=("x",), priority=50)
    assert db.execute("select count(*) as n from public.coding_jobs").fetchone() == {"n": 0}


def test_a_prompt_is_stored_once_and_never_logged(
    broker: SupabaseBroker, db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = "SECRET-PROMPT-" + "x" * 200_000
    seen: list[int] = []

    @dramatiq.actor(broker=broker, max_retries=0)
    def run_coding_job(prompt: str, session_id: str | None = None) -> None:
        seen.append(len(prompt))
        raise RuntimeError("the sandbox failed")

    caplog.set_level(logging.DEBUG)
    sent = run_coding_job.send(prompt=prompt)
    with running_worker(broker, threads=1):
        row = wait_for_status(db, sent.message_id, "failed", TIMEOUT_S)

    # The actor got the whole prompt, the row keeps it once (in its column), and no log line has any of it
    assert seen == [len(prompt)]
    assert row["prompt"] == prompt and "prompt" not in row["kwargs"]
    assert not any("SECRET-PROMPT" in r.getMessage() + (r.exc_text or "") for r in caplog.records)
