"""The benchmark's no-op actor, declared the same way on every broker under test."""

from __future__ import annotations

import dramatiq

from bench.stamp import declare_stamp
from bench.stopwatch import Stopwatch

#: One queue of its own, so the benchmark never touches a real queue's messages.
QUEUE_NAME = "bench_throughput"
ACTOR_NAME = "bench_noop"


def noop() -> None:
    """Does nothing: the benchmark measures the broker and Dramatiq around the job, not the job."""


def declare_actor(broker: dramatiq.Broker) -> dramatiq.Actor[[], None]:
    """The no-op actor on `broker`, for the worker and for the harness that pre-loads its messages."""
    # No retries: a failure is reported, never hidden by a second attempt.
    decorate = dramatiq.actor(broker=broker, actor_name=ACTOR_NAME, queue_name=QUEUE_NAME, max_retries=0)
    return decorate(noop)


def declare(broker: dramatiq.Broker) -> dramatiq.Actor[[], None]:
    """In a worker module: make `broker` global, time its jobs when the harness asks, declare the actors."""
    stopwatch = Stopwatch.from_environ()
    if stopwatch is not None:
        broker.add_middleware(stopwatch)
    dramatiq.set_broker(broker)
    declare_stamp(broker)
    return declare_actor(broker)
