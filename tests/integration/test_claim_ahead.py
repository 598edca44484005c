"""CLAIM_AHEAD_JOBS=0 with short jobs: claimed ahead while jobs are short, handed back when threads turn busy.

The guarantee the setting gives stays: a job this worker cannot start soon goes back to the queue within
HAND_BACK_AFTER_S, rings the doorbell, and an idle worker elsewhere starts it while this one is still busy.
"""

from __future__ import annotations

import logging

import pytest

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
            holders = wait_until(
                lambda: {job(db, m.message_id)["locked_by"] for m in (first, second)} == {"busy", "idle"},
                SETTLE_TIMEOUT_S,
                lambda: [job(db, m.message_id) for m in (first, second)],
            )
            assert holders
            assert {job(db, m.message_id)["status"] for m in (first, second)} == {"processing"}
            wait_for_all(db, [first.message_id, second.message_id], "completed", LONG_JOB_MS / 1000 * 3)

    # And each long job ran once
    assert len(busy_actors.runs.of("slow", "started")) + len(idle_actors.runs.of("slow", "started")) == 2
    assert HAND_BACK_AFTER_S * 1000 < LONG_JOB_MS
