"""A waiting consumer sleeps: no CPU burnt while every thread is busy, or while the queue is empty."""

from __future__ import annotations

import time

from tests.support.actors import declare_test_actors
from tests.support.brokers import BrokerFactory, Db, running_worker, status_counts, wait_until

#: Seconds of waiting over which the process's CPU time is measured.
WATCH_S = 2.0
#: CPU seconds a sleeping consumer may use in that time; a spinning one uses about WATCH_S.
MAX_CPU_S = 0.5
#: Milliseconds the job that keeps the only thread busy runs.
BUSY_JOB_MS = 4_000


def cpu_seconds_over(seconds: float) -> float:
    started = time.process_time()
    time.sleep(seconds)
    return time.process_time() - started


def test_a_consumer_with_no_free_thread_waits_without_spinning(make_broker: BrokerFactory, db: Db) -> None:
    # Given a worker whose only thread runs a long job, with another job waiting it may not claim
    broker = make_broker(claim_ahead=0)
    actors = declare_test_actors(broker)
    for key in ("busy", "waiting"):
        actors.slow.send(key, BUSY_JOB_MS)

    with running_worker(broker, threads=1):
        wait_until(lambda: status_counts(db).get("processing", 0) == 1, 10, "the first job to start")
        # When the poll interval passes again and again while the thread stays busy
        used = cpu_seconds_over(WATCH_S)

    # Then the consumer slept until an ack could free room, instead of looping
    assert used < MAX_CPU_S, f"{used:.2f} CPU seconds in {WATCH_S} s of waiting"


def test_an_idle_worker_waits_without_spinning(make_broker: BrokerFactory) -> None:
    broker = make_broker(claim_ahead=0)
    declare_test_actors(broker)
    with running_worker(broker, threads=2):
        time.sleep(0.5)
        used = cpu_seconds_over(WATCH_S)
    assert used < MAX_CPU_S, f"{used:.2f} CPU seconds in {WATCH_S} s with an empty queue"
