"""CLAIM_AHEAD_JOBS=0 with short jobs: claimed ahead while jobs are short, handed back when threads turn busy.

The guarantee the setting gives stays: a job this worker cannot start soon goes back to the queue within
HAND_BACK_AFTER_S, rings the doorbell, and an idle worker elsewhere starts it while this one is still busy.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from dramatiq.middleware import SkipMessage

from broker.claim_ahead import HAND_BACK_AFTER_S
from tests.support.actors import declare_test_actors
from tests.support.brokers import BrokerFactory, Db, job, running_worker, wait_for_all, wait_until

#: Seconds a job of these tests may take to be run.
SETTLE_TIMEOUT_S = 10
#: Milliseconds a long job runs: far longer than a hand-back takes.
LONG_JOB_MS = 4_000
#: Short jobs run first, so the worker has seen that jobs are short.
SHORT_JOBS = 8


def test_a_job_claimed_ahead_behind_a_long_job_goes_back_and_an_idle_worker_starts_it(
    make_broker: BrokerFactory, db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.consumer")
    busy = make_broker(claim_ahead=0, worker_id="busy")
    idle = make_broker(claim_ahead=0, worker_id="idle")
    busy_actors, idle_actors = declare_test_actors(busy), declare_test_actors(idle)

    with running_worker(busy, threads=1):
        # Given a one-thread worker that has seen only short jobs
        short = [busy_actors.record.send(f"short-{i}") for i in range(SHORT_JOBS)]
        wait_for_all(db, [m.message_id for m in short], "completed", SETTLE_TIMEOUT_S)

        # When two long jobs arrive together: it claims both, one to run and one ahead
        first, second = busy.enqueue_many([busy_actors.slow.message(key, LONG_JOB_MS) for key in "ab"])

        # Then the one its thread cannot start goes back to the queue, as the log says
        wait_until(
            lambda: any("Handed back 1 job(s)" in r.getMessage() for r in caplog.records),
            SETTLE_TIMEOUT_S,
            "a job claimed ahead to be handed back",
        )
        # And an idle worker starts it while the busy one still runs the other
        with running_worker(idle, threads=1):
            # (both rows in one look, retried: on a loaded machine the idle worker's thread can be slow
            # enough to pick its job up that the job goes back once before it starts)
            def both_running() -> bool:
                rows = [job(db, m.message_id) for m in (first, second)]
                return {(r["locked_by"], r["status"]) for r in rows} == {
                    ("busy", "processing"),
                    ("idle", "processing"),
                }

            wait_until(
                both_running, SETTLE_TIMEOUT_S, lambda: [job(db, m.message_id) for m in (first, second)]
            )
            wait_for_all(db, [first.message_id, second.message_id], "completed", LONG_JOB_MS / 1000 * 3)

    # And each long job ran once
    assert len(busy_actors.runs.of("slow", "started")) + len(idle_actors.runs.of("slow", "started")) == 2
    assert HAND_BACK_AFTER_S * 1000 < LONG_JOB_MS


def test_a_job_handed_back_as_its_thread_picks_it_up_never_completes_unrun(
    make_broker: BrokerFactory, db: Db
) -> None:
    # Given a worker that claimed two jobs ahead (the chaos smoke test caught this race: a job handed back
    # while Dramatiq's worker thread was taking it from the work queue was skipped, and the ack Dramatiq gives
    # a skipped message completed it although it never ran)
    # (Dramatiq's prefetch: the consumer hands nothing back itself, so the test says when one goes back)
    broker = make_broker(worker_id="racer")
    actors = declare_test_actors(broker)
    sent = [actors.record.send(key) for key in ("handed-back", "runs")]
    consumer = broker.consume(sent[0].queue_name, prefetch=2, timeout=100)
    claimed: list[Any] = []

    def both_claimed() -> bool:
        message = next(consumer)
        if message is not None:
            claimed.append(message)
        return len(claimed) == 2

    wait_until(both_claimed, SETTLE_TIMEOUT_S, "both jobs claimed")
    by_key = {proxy.args[0]: proxy for proxy in claimed}
    handed_back, runs = by_key["handed-back"], by_key["runs"]

    # When the consumer hands one back just as a worker thread picks it up: Dramatiq skips it and acks it
    assert broker.holdings.take_back([handed_back]) == [handed_back]
    with pytest.raises(SkipMessage):
        broker.emit_before("process_message", handed_back)
    broker.emit_after("skip_message", handed_back)
    consumer.ack(handed_back)
    # and the other runs and is acked after it (acks commit in order, in batches)
    broker.emit_before("process_message", runs)
    broker.emit_after("process_message", runs)
    consumer.ack(runs)
    wait_for_all(db, [runs.message_id], "completed", SETTLE_TIMEOUT_S)

    # Then the skipped job is still held, for its hand-back to return it, not completed unrun
    assert job(db, handed_back.message_id)["status"] == "processing"
    assert broker.settler.release([handed_back]) == 1
    assert job(db, handed_back.message_id)["status"] == "pending"
    consumer.close()
