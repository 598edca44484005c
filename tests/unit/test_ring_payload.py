"""Doorbell payloads: when a ring's job is due, by this host's clock, whatever the database's clock says."""

from __future__ import annotations

import time

from broker.transport import ring_due_at_ms


def test_a_job_due_now_is_due_now_even_when_the_database_clock_runs_ahead() -> None:
    # Given a ring from a database whose clock is a minute ahead of this host's
    ahead_ms = int(time.time() * 1000) + 60_000

    # Then a job the database says is due now is due now here
    assert ring_due_at_ms({"queue": "q", "run_at": ahead_ms, "delay_ms": 0}) <= time.time() * 1000


def test_a_delayed_job_is_due_after_its_delay_by_this_host_clock() -> None:
    before = int(time.time() * 1000)
    due = ring_due_at_ms({"queue": "q", "run_at": 0, "delay_ms": 5_000})
    assert before + 5_000 <= due <= time.time() * 1000 + 5_000


def test_rings_of_the_previous_version_use_run_at() -> None:
    assert ring_due_at_ms({"queue": "q", "run_at": 1234}) == 1234
    assert ring_due_at_ms({"queue": "q"}) == 0
