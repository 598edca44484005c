"""The broker over the Supabase REST transport: what only REST has to survive.

Realtime wake-ups beside polling, claims whose reply is lost after the commit, 503s and timeouts, and the
start-up error for the anon key. The broker's shared behaviour over REST is the parametrised suite
(conftest.py's "rest" kind); these tests run against the same stand-ins: the PostgREST-compatible endpoint
(tests/support/postgrest.py) and the Realtime Phoenix-channel server (tests/support/realtime_server.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import timedelta
from typing import Any

import pytest

from broker.broker import SupabaseBroker
from broker.errors import QueueAccessDenied
from broker.realtime import RING_EVENT, RealtimeDoorbell
from broker.rest import RestTransport
from broker.transport import Doorbell, PresenceListener, WorkerInfo
from service.settings import load_settings
from service.wiring import build_broker as build_broker_from_settings
from tests.support.actors import declare_test_actors
from tests.support.brokers import (
    Db,
    Settlements,
    build_broker,
    insert_job,
    job,
    jobs,
    running_worker,
    wait_for_all,
    wait_for_status,
    wait_until,
)
from tests.support.postgrest import PostgrestEndpoint, running_postgrest
from tests.support.realtime_server import RealtimeServer

#: Milliseconds between polls in the Realtime test: long beside a wake-up, so a poll and a ring differ.
REALTIME_POLL_MS = 3_000
#: Seconds beyond a poll interval that jobs may take to complete when only polling can find them.
POLL_SLACK_S = 3.0
#: Milliseconds of a lease in the lost-reply tests: short, so the lease rescue returns lost claims quickly.
SHORT_LEASE_MS = 1_000
#: Seconds an RPC may take in the timeout tests before the transport gives up on it.
SHORT_RPC_TIMEOUT_S = 0.5
#: Seconds the endpoint holds back a committed reply in the timeout tests: past SHORT_RPC_TIMEOUT_S.
LATE_REPLY_S = 1.0
#: Seconds every job of a test may take to settle, faults included: Dramatiq restarts a consumer after 3 s
#: (CONSUMER_RESTART_DELAY) and retries a failed ack or nack after 5 s (POST_PROCESS_MESSAGE_RETRY_DELAY_SECS)
SETTLE_TIMEOUT_S = 15
#: Seconds any other wait may take.
TIMEOUT_S = 10

RestBrokerFactory = Callable[..., SupabaseBroker]


class RestTransportWithRealtimeAt(RestTransport):
    """A RestTransport whose doorbell joins the Realtime stand-in, with quick reconnects.

    On Supabase the REST API and Realtime share the project URL; here they are two local servers.
    """

    def __init__(self, url: str, key: str, *, realtime_url: str, **options: Any) -> None:
        super().__init__(url, key, **options)
        self.realtime_url = realtime_url
        self.realtime_key = key
        self.doorbells: list[RealtimeDoorbell] = []

    def doorbell(
        self, worker: WorkerInfo | None = None, presence: PresenceListener | None = None
    ) -> Doorbell | None:
        bell = RealtimeDoorbell(
            self.realtime_url, self.realtime_key, initial_backoff_s=0.05, max_backoff_s=0.2, join_timeout_s=2
        )
        self.doorbells.append(bell)
        return bell


@pytest.fixture
def endpoint(database_url: str) -> Iterator[PostgrestEndpoint]:
    with running_postgrest(database_url) as running:
        yield running


@pytest.fixture
def realtime(endpoint: PostgrestEndpoint) -> Iterator[RealtimeServer]:
    server = RealtimeServer(endpoint.service_role_key)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def rest_broker(endpoint: PostgrestEndpoint) -> Iterator[RestBrokerFactory]:
    """Builds brokers over RestTransport on the test's endpoint, without Realtime unless given a server."""
    with ExitStack() as stack:

        def make(
            *, realtime: RealtimeServer | None = None, timeout_s: float = TIMEOUT_S, **options: Any
        ) -> SupabaseBroker:
            transport: RestTransport
            if realtime is None:
                transport = RestTransport(
                    endpoint.url, endpoint.service_role_key, timeout_s=timeout_s, realtime=False
                )
            else:
                transport = RestTransportWithRealtimeAt(
                    endpoint.url, endpoint.service_role_key, realtime_url=realtime.url, timeout_s=timeout_s
                )
            broker = build_broker(transport, **options)
            stack.callback(broker.close)
            return broker

        yield make


def test_polling_keeps_jobs_moving_while_realtime_is_down_and_the_doorbell_comes_back(
    rest_broker: RestBrokerFactory, realtime: RealtimeServer, db: Db
) -> None:
    # A claim pushes the consumer's next poll to poll_interval after it, and a claim sets started_at. So a job
    # claimed less than a poll interval after the previous claim was claimed because something rang.
    poll_s = REALTIME_POLL_MS / 1000
    broker = rest_broker(realtime=realtime, poll_interval_ms=REALTIME_POLL_MS)
    assert isinstance(broker.transport, RestTransportWithRealtimeAt)
    actors = declare_test_actors(broker)

    with running_worker(broker, threads=2):
        assert realtime.wait_for_joins(1, TIMEOUT_S), "the doorbell never joined"

        # Given the Realtime server went away
        realtime.stop()

        # When jobs arrive meanwhile, then polling alone runs them, within a poll interval
        while_down = [insert_job(db, actor_name="record", args=[f"while-down-{i}"]) for i in range(3)]
        rows = wait_for_all(db, while_down, "completed", poll_s + POLL_SLACK_S)
        (bell,) = broker.transport.doorbells
        assert bell.running  # still trying to reconnect: the Python client alone would have given up
        last_poll = max(row["started_at"] for row in rows)

        # When the server comes back, then the doorbell joins again and rings, so a job inserted just
        # before is claimed at once, not at the next poll
        missed = insert_job(db, actor_name="record", args=["missed"])
        realtime.start()
        assert realtime.wait_for_joins(2, TIMEOUT_S), "the doorbell never joined again"
        resubscribed = wait_for_status(db, missed, "completed", poll_s)
        assert resubscribed["started_at"] - last_poll < timedelta(seconds=poll_s)

        # And a Broadcast ring (what the migration's trigger sends on Supabase) wakes the worker again
        rung = insert_job(db, actor_name="record", args=["rung"])
        assert realtime.broadcast(RING_EVENT, {"queue": "default", "run_at": int(time.time() * 1000)}) == 1
        woken = wait_for_status(db, rung, "completed", poll_s)
        assert woken["started_at"] - resubscribed["started_at"] < timedelta(seconds=poll_s)

    assert sorted(actors.runs.keys("record")) == sorted(
        ["missed", "rung", *(f"while-down-{i}" for i in range(3))]
    )


def test_a_claim_whose_reply_is_lost_loses_no_job_and_runs_none_twice(
    rest_broker: RestBrokerFactory, endpoint: PostgrestEndpoint, db: Db
) -> None:
    # Given six jobs, and an endpoint that commits the next claim and then drops the connection
    brokers = [rest_broker(lease_ms=SHORT_LEASE_MS) for _ in range(2)]
    actors = [declare_test_actors(b) for b in brokers]
    ids = [actors[0].record.send(f"job-{i}").message_id for i in range(6)]
    endpoint.faults.drop_after_commit(fn="claim_jobs")

    # When two workers, claiming up to four jobs each, start: one of them never gets its first claim's reply
    with (
        running_worker(brokers[0], threads=2, prefetch=4, queues={"default"}),
        running_worker(brokers[1], threads=2, prefetch=4, queues={"default"}),
    ):
        # Then it asks again with the same claim token and gets the jobs the lost reply held: every job
        # completes, with no rescue and no retry
        rows = wait_for_all(db, ids, "completed", SETTLE_TIMEOUT_S)

    # ... each run exactly once, by one worker or the other
    ran = [key for a in actors for key in a.runs.keys("record")]
    assert sorted(ran) == sorted(f"job-{i}" for i in range(6))
    assert all((row["retry_count"], row["rescue_count"]) == (0, 0) for row in rows)
    assert endpoint.calls["claim_jobs"] >= 3


def test_claims_answered_with_503_or_too_late_are_retried(
    rest_broker: RestBrokerFactory, endpoint: PostgrestEndpoint, db: Db
) -> None:
    broker = rest_broker(timeout_s=SHORT_RPC_TIMEOUT_S, lease_ms=SHORT_LEASE_MS)
    actors = declare_test_actors(broker)
    ids = [actors.record.send(f"job-{i}").message_id for i in range(8)]
    # Given an endpoint whose first claim answers 503, and whose next one commits but answers too late
    endpoint.faults.fail(status=503, fn="claim_jobs")
    endpoint.faults.delay(LATE_REPLY_S, fn="claim_jobs")

    with running_worker(broker, threads=2, prefetch=4, queues={"default"}):
        # Then the worker claims again with the same claim token (the consumer keeps running), gets what the
        # late claim took, and every job completes
        rows = wait_for_all(db, ids, "completed", SETTLE_TIMEOUT_S)

    assert sorted(actors.runs.keys("record")) == sorted(f"job-{i}" for i in range(8))
    assert endpoint.calls["claim_jobs"] >= 3
    # Each run once, with no retry and no rescue spent on the lost replies
    assert all((row["retry_count"], row["rescue_count"]) == (0, 0) for row in rows)


def test_acks_retries_and_dead_letters_answered_with_503_or_too_late_are_retried(
    rest_broker: RestBrokerFactory, endpoint: PostgrestEndpoint, db: Db
) -> None:
    broker = rest_broker(timeout_s=SHORT_RPC_TIMEOUT_S)
    settlements = Settlements()
    broker.add_middleware(settlements)
    actors = declare_test_actors(broker)
    # Given an endpoint that answers the next acks with 503s and then too late (after committing), and the
    # next retry, dead letter and lease extension with 503s
    endpoint.faults.fail(status=503, fn="complete_jobs", times=2)
    endpoint.faults.delay(LATE_REPLY_S, fn="complete_jobs")
    endpoint.faults.fail(status=503, fn="retry_job")
    endpoint.faults.fail(status=503, fn="dead_letter_job")

    # When jobs that succeed, one that fails once and one that is rejected run
    records = [actors.record.send(f"job-{i}").message_id for i in range(6)]
    flaky = actors.flaky.send("once", 1).message_id
    rejected = actors.reject.send("bad").message_id
    with running_worker(broker, threads=2, queues={"default"}):
        wait_for_all(db, records, "completed", SETTLE_TIMEOUT_S)
        retried = wait_for_status(db, flaky, "completed", SETTLE_TIMEOUT_S)
        failed = wait_for_status(db, rejected, "failed", SETTLE_TIMEOUT_S)

    # Then each call got through in the end: every job reached the state its run asked for, run by run
    assert sorted(actors.runs.keys("record")) == sorted(f"job-{i}" for i in range(6))
    assert retried["retry_count"] == 1
    assert retried["error_message"].startswith("RuntimeError: flaky once failed attempt 1")
    assert [run.retries for run in actors.runs.of("flaky", "started")] == [0, 1]
    assert failed["retry_count"] == 0 and failed["error_message"].startswith("ValueError: rejected bad")
    assert len(actors.runs.of("reject")) == 1
    assert settlements.nacked == [rejected]
    assert {row["status"] for row in jobs(db)} == {"completed", "failed"}
    for fn in ("complete_jobs", "retry_job", "dead_letter_job"):
        assert endpoint.calls[fn] >= 2, fn


def test_a_running_job_keeps_its_lease_through_a_503(
    rest_broker: RestBrokerFactory, endpoint: PostgrestEndpoint, db: Db
) -> None:
    broker = rest_broker(lease_ms=1_200)  # extended every 400 ms: a failed extension leaves two more tries
    actors = declare_test_actors(broker)
    message = actors.slow.send("long", 2_500)

    with running_worker(broker, threads=1, queues={"default"}):
        wait_until(lambda: actors.runs.of("slow", "started"), TIMEOUT_S, "the job to start")
        # Given the next heartbeat (which extends the lease) is answered with 503s, its repeat too
        endpoint.faults.fail(status=503, fn="worker_heartbeat", times=2)
        held_until = job(db, message.message_id)["lease_expires_at"]
        extensions = endpoint.calls["worker_heartbeat"]

        # Then one after it extends the lease (no extension after this read can come before the failed
        # one), while the job still runs
        extended = wait_until(
            lambda: (
                endpoint.calls["worker_heartbeat"] >= extensions + 3
                and (row := job(db, message.message_id))["lease_expires_at"] > held_until
                and row
            ),
            TIMEOUT_S,
            "the failed extension, and another that extended the lease",
        )
        assert extended["status"] == "processing"
        assert not actors.runs.of("slow", "finished")

        # And the job completes, run once, no retry counted
        row = wait_for_status(db, message.message_id, "completed", TIMEOUT_S)

    assert row["retry_count"] == 0 and row["error_message"] is None
    assert len(actors.runs.of("slow", "started")) == 1


def test_the_anon_key_gives_the_clear_startup_error(endpoint: PostgrestEndpoint) -> None:
    def settings_with(key: str) -> Any:
        return load_settings(supabase_url=endpoint.url, supabase_service_role_key=key, queue_transport="rest")

    # The service role key builds a broker over REST without a call, and its start-up check passes
    broker = build_broker_from_settings(settings_with(endpoint.service_role_key))
    try:
        assert isinstance(broker.transport, RestTransport)
        assert endpoint.calls["queue_ping"] == 0
        broker.transport.check_schema()
    finally:
        broker.close()
    assert endpoint.calls["queue_ping"] == 1

    # The anon key is refused by the start-up check, with what to do about it, and the key appears nowhere
    anon = build_broker_from_settings(settings_with(endpoint.anon_key))
    with pytest.raises(QueueAccessDenied) as refused:
        anon.transport.check_schema()
    anon.close()
    message = str(refused.value)
    assert "Use the service role key (SUPABASE_SERVICE_ROLE_KEY), not the anon key" in message
    assert "queue_ping" in message
    assert endpoint.anon_key not in message
    assert endpoint.calls["queue_ping"] == 2


def test_a_retry_refused_with_a_4xx_falls_back_to_a_plain_dead_letter_and_the_worker_goes_on(
    rest_broker: RestBrokerFactory, endpoint: PostgrestEndpoint, db: Db
) -> None:
    broker = rest_broker()
    actors = declare_test_actors(broker)
    # Given an endpoint that refuses the next retry with a 400 (as PostgREST does for text PostgreSQL refuses)
    endpoint.faults.fail(status=400, fn="retry_job")
    flaky = actors.flaky.send("refused", 1).message_id

    with running_worker(broker, threads=1, queues={"default"}):
        # Then the job is dead-lettered with a plain message instead of being left processing forever
        row = wait_for_status(db, flaky, "failed", TIMEOUT_S)
        after = actors.record.send("after").message_id
        wait_for_status(db, after, "completed", TIMEOUT_S)

    assert row["error_message"].startswith("RuntimeError: flaky refused failed attempt 1")
    assert "the full error could not be stored" in row["error_message"]


def test_a_job_nobody_can_settle_is_let_go_not_extended_forever(
    rest_broker: RestBrokerFactory, endpoint: PostgrestEndpoint, db: Db
) -> None:
    broker = rest_broker(lease_ms=SHORT_LEASE_MS)
    actors = declare_test_actors(broker)
    # Given an endpoint that refuses both the retry and the dead letter (a rotated key answers 401 to both)
    endpoint.faults.fail(status=401, fn="retry_job")
    endpoint.faults.fail(status=401, fn="dead_letter_job")
    flaky = actors.flaky.send("stranded", 1).message_id

    with running_worker(broker, threads=1, queues={"default"}):
        # Then the worker lets it go: its lease runs out, the rescue returns it, and it runs again (once the
        # key works) to completion; meanwhile the worker kept working
        after = actors.record.send("after").message_id
        wait_for_status(db, after, "completed", TIMEOUT_S)
        row = wait_for_status(db, flaky, "completed", SETTLE_TIMEOUT_S)

    # ... after its lease ran out once, then a retry (counted now that the queue accepts it), then success
    assert (row["rescue_count"], row["retry_count"]) == (1, 1)
    assert len(actors.runs.of("flaky", "started")) == 3


def test_a_bad_row_whose_dead_letter_and_release_fail_is_not_kept_alive(
    rest_broker: RestBrokerFactory, endpoint: PostgrestEndpoint, db: Db
) -> None:
    broker = rest_broker(lease_ms=SHORT_LEASE_MS)
    actors = declare_test_actors(broker)
    # Given a batch with a row that does not decode, and an endpoint that fails dead letters and releases
    bad = insert_job(db, args={"not": "an array"})
    good = [actors.record.send(f"good-{i}").message_id for i in range(3)]
    endpoint.faults.fail(status=503, fn="dead_letter_job", times=2)
    endpoint.faults.fail(status=503, fn="release_jobs", times=2)

    with running_worker(broker, threads=2, prefetch=4, queues={"default"}):
        # Then the good jobs run, and the bad row is never held: its lease is not extended, it comes back
        # when the lease runs out, and is dead-lettered then
        wait_for_all(db, good, "completed", TIMEOUT_S)
        row = wait_for_status(db, bad, "failed", SETTLE_TIMEOUT_S)

    assert "payload does not decode: args must be a JSON array" in row["error_message"]
    assert row["rescue_count"] == 1
