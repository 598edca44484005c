"""Pickup timing: an actor that reports, over UDP to the harness, when it started and when its job was sent.

The producer passes `time.monotonic()` of the moment it called `send()` as the job's only argument; the actor
sends that and its own `time.monotonic()` back as one datagram. CLOCK_MONOTONIC is one clock for every process
of a Linux machine, so the difference is the job's pickup latency: send, wake-up, claim, hand-off to a thread.
"""

from __future__ import annotations

import os
import socket
import time

import dramatiq

from bench.environment import PICKUP_PORT_ENV

#: A queue of its own beside the throughput queue.
STAMP_QUEUE = "bench_pickup"
STAMP_ACTOR = "bench_stamp"

_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def stamp(sent_at: float) -> None:
    """Report `sent_at` and now to the harness."""
    started_at = time.monotonic()
    port = os.environ.get(PICKUP_PORT_ENV)
    if port:
        _socket.sendto(f"{sent_at!r} {started_at!r}".encode(), ("127.0.0.1", int(port)))


def declare_stamp(broker: dramatiq.Broker) -> dramatiq.Actor[[float], None]:
    """The stamp actor on `broker`, for the worker and for the producer."""
    decorate = dramatiq.actor(broker=broker, actor_name=STAMP_ACTOR, queue_name=STAMP_QUEUE, max_retries=0)
    return decorate(stamp)
