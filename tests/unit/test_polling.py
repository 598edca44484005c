"""The polling doorbell's schedule (broker/polling.py): often after work, backing off to the idle interval."""

from __future__ import annotations

import random
import threading
import time

import pytest

from broker.polling import PollingDoorbell, PollPolicy

#: Seconds any wait of these tests may take.
TIMEOUT_S = 5.0


def test_busy_after_recent_work_then_backing_off_by_doubling_to_idle() -> None:
    policy = PollPolicy(busy_ms=250, idle_ms=1_000, busy_window_ms=10_000, jitter=0)

    # Work found a moment ago: the busy interval
    assert policy.next_interval_s(since_work_s=1.0) == 0.25
    # The busy window over: doubling back to the idle interval, and staying there
    assert [policy.next_interval_s(since_work_s=11.0) for _ in range(4)] == [0.5, 1.0, 1.0, 1.0]
    # Never any work: idle
    assert PollPolicy(busy_ms=250, idle_ms=1_000, jitter=0).next_interval_s(None) == 1.0


def test_jitter_stays_within_its_fraction() -> None:
    policy = PollPolicy(busy_ms=1_000, idle_ms=1_000, jitter=0.2, rng=random.Random(7))
    intervals = [policy.next_interval_s(None) for _ in range(200)]
    assert min(intervals) >= 0.8 and max(intervals) <= 1.2
    assert max(intervals) - min(intervals) > 0.2  # processes started together drift apart


def test_intervals_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="busy_ms"):
        PollPolicy(busy_ms=2_000, idle_ms=1_000)


def test_the_doorbell_rings_every_consumer_until_stopped() -> None:
    rings: list[tuple[str | None, int]] = []
    rung = threading.Event()

    def ring(queue: str | None, run_at_ms: int) -> None:
        rings.append((queue, run_at_ms))
        if len(rings) >= 3:
            rung.set()

    doorbell = PollingDoorbell(lambda: None, PollPolicy(busy_ms=10, idle_ms=10, jitter=0))
    doorbell.start(ring)
    try:
        assert rung.wait(TIMEOUT_S)
    finally:
        doorbell.stop()
    count = len(rings)
    time.sleep(0.05)
    assert len(rings) == count  # stopped means no more rings
    assert set(rings) == {(None, 0)}  # "look at every queue, now"
