"""The short-jobs claim-ahead policy: room only while the average run is short, none per long-running job."""

from __future__ import annotations

from broker.claim_ahead import SHORT_JOB_S, ShortJobs


def test_no_room_before_any_job_ran() -> None:
    assert ShortJobs().room(threads=4, running_long=0) == 0


def test_room_per_thread_not_running_a_long_job_while_jobs_are_short() -> None:
    jobs = ShortJobs()
    for _ in range(5):
        jobs.ran(SHORT_JOB_S / 10)
    assert jobs.room(threads=4, running_long=0) == 4
    assert jobs.room(threads=4, running_long=3) == 1
    assert jobs.room(threads=4, running_long=9) == 0


def test_long_runs_close_the_room_within_a_few_jobs() -> None:
    jobs = ShortJobs()
    for _ in range(20):
        jobs.ran(SHORT_JOB_S / 10)
    jobs.ran(SHORT_JOB_S * 20)
    assert jobs.room(threads=4, running_long=0) == 0
