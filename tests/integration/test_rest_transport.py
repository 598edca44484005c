"""The Supabase REST transport against the PostgREST-compatible endpoint over the test's real database."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from broker.errors import ConnectionClosed, QueueAccessDenied, QueueError, QueueSchemaMissing
from broker.rest import RestTransport
from broker.transport import Claim, ClaimedJob, NewJob, PresencePolicy, Transport, WorkerInfo
from service.settings import load_settings
from service.transports import build_transport
from tests.support.postgrest import PostgrestEndpoint, running_postgrest

#: Seconds any wait in these tests may take.
DEADLINE_S = 10.0
#: Milliseconds a short lease lasts, for tests that wait for it to expire.
SHORT_LEASE_MS = 300

Db = psycopg.Connection[dict[str, Any]]


@pytest.fixture
def endpoint(database_url: str) -> Iterator[PostgrestEndpoint]:
    with running_postgrest(database_url) as running:
        yield running


@pytest.fixture
def transport(endpoint: PostgrestEndpoint) -> Iterator[RestTransport]:
    rest = RestTransport(endpoint.url, endpoint.service_role_key, timeout_s=2.0, realtime=False)
    yield rest
    rest.close()


def new_job(queue: str = "default", priority: int = 0, max_retries: int = 3) -> NewJob:
    return NewJob(str(uuid.uuid4()), queue, "noop", [1], {"k": "v"}, {"o": 1}, priority, max_retries)


def claim_of(job: ClaimedJob) -> Claim:
    return Claim(job.id, job.claim_token)


#: A heartbeat worker as a test registers one: claims need a registered worker.
TEST_PRESENCE = PresencePolicy(mode="heartbeat", heartbeat_interval_s=1.0, stale_after_ms=60_000)


def claim(
    transport: Transport, worker_id: str, limit: int, lease_ms: int, queue: str = "default"
) -> list[ClaimedJob]:
    """Register `worker_id` (again, harmlessly) and claim with a fresh claim token."""
    transport.register_worker(WorkerInfo(worker_id, "test-host", 1, (queue,)), TEST_PRESENCE)
    return transport.claim(worker_id, queue, limit, lease_ms, str(uuid.uuid4()))


def complete(transport: Transport, held: Claim) -> bool:
    return held.job_id in transport.complete_many([held])


def row(db: Db, job_id: str) -> dict[str, Any]:
    found = db.execute("select * from public.coding_jobs where id = %s", (job_id,)).fetchone()
    assert found is not None
    return found


def wait_until_lease_expired(db: Db, job_id: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    query = "select lease_expires_at < now() as expired from public.coding_jobs where id = %s"
    while not (db.execute(query, (job_id,)).fetchone() or {}).get("expired"):
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.05)


def test_claim_complete_round_trip_in_batches(
    transport: RestTransport, endpoint: PostgrestEndpoint, db: Db
) -> None:
    # Given three jobs of different priorities, enqueued in one request
    jobs = [new_job(priority=p) for p in (0, 10, 5)]
    assert transport.enqueue(jobs) == 3
    assert transport.enqueue(jobs[:1]) == 0  # an id seen before is ignored

    # When one worker claims up to ten
    claimed = claim(transport, "worker-a", 10, 60_000)

    # Then one request brought all three, highest priority first, with their message fields
    assert endpoint.calls["claim_jobs"] == 1
    assert [job.priority for job in claimed] == [10, 5, 0]
    assert claimed[0].args == [1] and claimed[0].kwargs == {"k": "v"} and claimed[0].options == {"o": 1}
    assert claimed[0].created_at.tzinfo is not None
    assert row(db, claimed[0].id)["locked_by"] == "worker-a"
    assert claim(transport, "worker-b", 10, 60_000) == []

    # And completing each is fenced by its claim token
    assert all(complete(transport, claim_of(job)) for job in claimed)
    assert complete(transport, claim_of(claimed[0])) is True  # idempotent per claim: a lost reply is harmless
    completed = db.execute(
        "select count(*) as n from public.coding_jobs where status = 'completed'"
    ).fetchone()
    assert completed == {"n": 3}


def test_retry_dead_letter_release_extend_purge_and_stats(transport: RestTransport, db: Db) -> None:
    transport.enqueue([new_job() for _ in range(4)])
    retried, dead, released, kept = claim(transport, "worker-a", 4, 60_000)

    assert transport.retry(claim_of(retried), 60_000, "boom", {"retries": 1}) is True
    assert transport.dead_letter(claim_of(dead), "gave up") is True
    beat = transport.heartbeat(
        "worker-a", [claim_of(kept), claim_of(dead)], lease_ms=120_000, queues=["default"], max_rescues=5
    )
    assert beat.registered and beat.held == {kept.id}
    assert transport.release([claim_of(released), claim_of(dead)]) == 1
    assert transport.release([]) == 0

    after_retry = row(db, retried.id)
    assert (after_retry["status"], after_retry["retry_count"], after_retry["error_message"]) == (
        "pending",
        1,
        "boom",
    )
    assert after_retry["options"] == {"retries": 1}
    assert (row(db, dead.id)["status"], row(db, dead.id)["error_message"]) == ("failed", "gave up")
    assert row(db, released.id)["status"] == "pending" and row(db, released.id)["retry_count"] == 0

    counts = {(stat.queue_name, stat.status): stat.jobs for stat in transport.stats()}
    assert counts == {("default", "pending"): 2, ("default", "processing"): 1, ("default", "failed"): 1}
    assert transport.purge("default") == 2


def test_requests_per_job_stay_batched_under_concurrent_workers(transport: RestTransport, db: Db) -> None:
    # Given 200 jobs and eight threads sharing one transport (one HTTP/1.1 connection pool)
    transport.enqueue([new_job() for _ in range(200)])
    runs: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while jobs := claim(transport, f"worker-{threading.get_ident()}", 10, 60_000):
                for job in jobs:
                    assert complete(transport, claim_of(job))
                    runs.append(job.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S)

    # Then every job ran exactly once
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert len(runs) == len(set(runs)) == 200
    assert db.execute(
        "select count(*) as n from public.coding_jobs where status <> 'completed'"
    ).fetchone() == {"n": 0}


def test_the_anon_key_and_a_foreign_key_are_refused(endpoint: PostgrestEndpoint) -> None:
    anon = RestTransport(endpoint.url, endpoint.anon_key, realtime=False)
    forged_key = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2lnbmVkLWJ5LXNvbWVvbmUtZWxzZQ"
    forged = RestTransport(endpoint.url, forged_key, realtime=False)
    try:
        for transport, key in ((anon, endpoint.anon_key), (forged, forged_key)):
            for call in (transport.check_schema, lambda t=transport: claim(t, "w", 1, 1000)):
                with pytest.raises(QueueAccessDenied) as refused:
                    call()
                assert "service role key" in str(refused.value)
                assert key not in str(refused.value)
    finally:
        anon.close()
        forged.close()


def test_a_lost_claim_reply_is_claimed_again_with_the_same_token_and_nothing_more(
    transport: RestTransport, endpoint: PostgrestEndpoint, db: Db
) -> None:
    # Given two jobs, and an endpoint that commits the next claim and then drops the connection
    first, second = new_job(priority=5), new_job()
    transport.enqueue([first, second])
    endpoint.faults.drop_after_commit(fn="claim_jobs")

    # When a worker claims one, the reply never arrives, and the transport asks again with the same token
    [claimed] = claim(transport, "worker-a", 1, 60_000)

    # Then the repeat answered the job the first call claimed, and claimed nothing more
    assert endpoint.calls["claim_jobs"] == 2
    assert claimed.id == first.id
    assert row(db, second.id)["status"] == "pending"
    assert complete(transport, claim_of(claimed)) is True


def test_a_claim_whose_replies_are_all_lost_comes_back_by_its_lease_without_spending_a_retry(
    transport: RestTransport, endpoint: PostgrestEndpoint, db: Db
) -> None:
    # Given a job with no retries left, and an endpoint that drops both the claim's replies
    [job] = [new_job(max_retries=0)]
    transport.enqueue([job])
    endpoint.faults.drop_after_commit(fn="claim_jobs", times=2)
    with pytest.raises(ConnectionClosed):
        claim(transport, "worker-a", 10, SHORT_LEASE_MS)

    # Then the job is held by its lease, and no other worker can take it meanwhile
    held = row(db, job.id)
    assert held["status"] == "processing" and held["locked_by"] == "worker-a"
    assert claim(transport, "worker-b", 10, 60_000) == []

    # When the lease expires, the rescue returns it to the queue counting a rescue, not a retry: a job that
    # never failed is not dead-lettered because infrastructure lost it
    wait_until_lease_expired(db, job.id)
    assert transport.rescue(max_rescues=5) == 1
    requeued = row(db, job.id)
    assert (requeued["status"], requeued["claim_token"]) == ("pending", None)
    assert (requeued["retry_count"], requeued["rescue_count"]) == (0, 1)

    # Then another worker runs it, and the lost claim's token can no longer change it
    [again] = claim(transport, "worker-b", 10, 60_000)
    assert again.id == job.id
    lost_claim = Claim(job.id, str(held["claim_token"]))
    assert complete(transport, lost_claim) is False
    assert transport.retry(lost_claim, 0, "late", {}) is False
    assert complete(transport, claim_of(again)) is True


def test_a_job_that_keeps_losing_its_worker_is_dead_lettered_as_a_poison_pill(
    transport: RestTransport, db: Db
) -> None:
    transport.enqueue([new_job()])
    for rescues in (1, 2):
        [job] = claim(transport, "worker-a", 1, SHORT_LEASE_MS)
        wait_until_lease_expired(db, job.id)
        assert transport.rescue(max_rescues=2) == 1
        after = row(db, job.id)
        assert after["rescue_count"] == rescues

    assert (after["status"], after["retry_count"]) == ("failed", 0)
    assert "2 times" in after["error_message"] and "keeps killing its worker" in after["error_message"]
    assert complete(transport, claim_of(job)) is False


def test_503s_become_connection_closed_and_the_retry_succeeds(
    transport: RestTransport, endpoint: PostgrestEndpoint, db: Db
) -> None:
    transport.enqueue([new_job()])
    [job] = claim(transport, "worker-a", 1, 60_000)
    endpoint.faults.fail(status=503, fn="complete_jobs", times=4)

    for _ in range(2):  # each call is tried twice
        with pytest.raises(ConnectionClosed, match="503"):
            complete(transport, claim_of(job))
    assert row(db, job.id)["status"] == "processing"  # the 503s never reached the database

    assert complete(transport, claim_of(job)) is True  # what Dramatiq's retry of the ack does


def test_a_late_reply_times_out_with_the_fractional_timeout(endpoint: PostgrestEndpoint, db: Db) -> None:
    # Given a transport with a 0.5 s timeout (postgrest-py alone would truncate it to 0 s)
    rest = RestTransport(endpoint.url, endpoint.service_role_key, timeout_s=0.5, realtime=False)
    try:
        rest.enqueue([new_job()])
        [job] = claim(rest, "worker-a", 1, 60_000)
        endpoint.faults.delay(2.0, fn="complete_jobs", times=2)

        # When the endpoint commits the ack but answers after 2 s
        started = time.monotonic()
        with pytest.raises(ConnectionClosed, match="ReadTimeout"):
            complete(rest, claim_of(job))

        # Then each of its two tries gave up after about half a second, and the ack itself was not lost
        assert 0.8 < time.monotonic() - started < 2.5
        assert row(db, job.id)["status"] == "completed"
    finally:
        rest.close()


def test_an_unreachable_api_is_connection_closed() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    rest = RestTransport(url, "key", timeout_s=1.0, realtime=False)
    try:
        with pytest.raises(ConnectionClosed, match="ConnectError"):
            rest.check_schema()
        with pytest.raises(ConnectionClosed):
            rest.ping(0.5)
    finally:
        rest.close()


def test_ping_has_its_own_timeout(transport: RestTransport, endpoint: PostgrestEndpoint) -> None:
    transport.ping(1.0)
    endpoint.faults.delay(1.5, fn="queue_ping")
    started = time.monotonic()
    with pytest.raises(ConnectionClosed):
        transport.ping(0.3)
    assert time.monotonic() - started < 1.0
    transport.ping(2.0)


def test_missing_functions_give_the_startup_error(transport: RestTransport, db: Db) -> None:
    db.execute("drop function public.queue_ping()")
    db.execute(
        "alter function public.claim_jobs(text, text, integer, integer, uuid) rename to claim_jobs_old"
    )

    with pytest.raises(QueueSchemaMissing, match=r"queue_ping.*PGRST202.*Apply the migrations"):
        transport.check_schema()
    with pytest.raises(QueueSchemaMissing, match="claim_jobs"):
        transport.claim("worker-a", "default", 1, 1000, str(uuid.uuid4()))


def test_other_database_errors_are_queue_errors(transport: RestTransport) -> None:
    with pytest.raises(QueueError, match="22P02") as failed:
        complete(transport, Claim("not-a-uuid", str(uuid.uuid4())))
    assert not isinstance(failed.value, QueueAccessDenied | QueueSchemaMissing)


def test_a_service_role_statement_timeout_applies_to_rpcs(database_url: str, db: Db) -> None:
    # The migrations set no role setting (issue 10, item 10), but an operator may, and PostgREST applies the
    # impersonated role's settings to each request.
    # Given one for this database only, and a slow function the service role may call
    db.execute(
        sql.SQL("alter role service_role in database {} set statement_timeout = '200ms'").format(
            sql.Identifier(db.info.dbname)
        )
    )
    db.execute("create function public.slow_call() returns void language sql as $$ select pg_sleep(2) $$")
    db.execute("grant execute on function public.slow_call() to service_role")

    with running_postgrest(database_url) as endpoint:
        rest = RestTransport(endpoint.url, endpoint.service_role_key, timeout_s=5.0, realtime=False)
        try:
            # Then the database cancels the call, and the transport reports a transient failure
            started = time.monotonic()
            with pytest.raises(ConnectionClosed, match="57014"):
                rest._rpc("slow_call")
            assert time.monotonic() - started < 1.5
        finally:
            rest.close()


def test_built_from_settings(endpoint: PostgrestEndpoint) -> None:
    settings = load_settings(
        supabase_url=endpoint.url,
        supabase_service_role_key=endpoint.service_role_key,
        queue_transport="rest",
        max_concurrent_jobs=3,
    )
    rest = build_transport(settings)
    assert isinstance(rest, RestTransport)
    try:
        rest.check_schema()
        assert rest.doorbell() is not None
        assert endpoint.service_role_key not in repr(vars(rest))
    finally:
        rest.close()


def test_over_rest_no_settling_function_settles_a_held_job_without_its_claim_token(
    transport: RestTransport, db: Db
) -> None:
    # Given a job a worker holds
    transport.enqueue([new_job()])
    [held] = claim(transport, "worker-a", 1, 60_000)

    # Then the RPCs that settle by id alone refuse it: the fence has no NULL-token hole over HTTP either
    assert transport._rpc("complete_job", {"job_id": held.id}) is False
    assert transport._rpc("fail_job", {"job_id": held.id, "error_msg": "x"}) is None
    assert (
        transport._rpc("dead_letter_job", {"job_id": held.id, "p_claim_token": None, "error_msg": "x"})
        is False
    )
    assert row(db, held.id)["status"] == "processing"
    assert complete(transport, claim_of(held)) is True
