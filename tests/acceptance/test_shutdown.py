"""Graceful shutdown of the real `dramatiq tasks` CLI: real signals, real deadlines, rows checked after."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import (
    CliProcess,
    Rows,
    WorkerProcesses,
    cli_env,
    insert_edge_jobs,
    job_rows,
    pid_of_worker_id,
    status_counts,
    wait_until,
)

pytestmark = pytest.mark.slow

#: seconds for a CLI to boot and claim its first job
BOOT_S = 30.0
#: seconds within which a dead worker's jobs are rescued on the direct transport (the target is 5)
RESCUE_S = 15.0
#: seconds beyond --worker-shutdown-timeout that a stop may take (Dramatiq notices signals once a second)
STOP_MARGIN_S = 5.0
#: The shutdown steps, in the order they must be logged.
STOP_CLAIMING = r"(?i)stop(s|ped|ping)? claiming"
WAITING_FOR_JOBS = r"(?i)waiting\b.*\bjob"
RELEASED = r"Released (\d+) prefetched job\(s\)"
SHUT_DOWN = r"Worker has been shut down"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerProcesses]:
    with WorkerProcesses(tmp_path) as started:
        yield started


def _processing(db: Rows) -> int:
    return status_counts(db).get("processing", 0)


def _first_index(cli: CliProcess, pattern: str) -> int:
    """The index of the first line matching `pattern` in the output so far, or -1."""
    regex = re.compile(pattern)
    return next((i for i, line in enumerate(cli.lines) if regex.search(line)), -1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_job_that_fits_the_timeout_finishes_and_the_exit_code_is_zero(
    signum: signal.Signals, db: Rows, database_url: str, workers: WorkerProcesses
) -> None:
    # Given a 3-second job in progress and a 10-second shutdown timeout
    [job_id] = insert_edge_jobs(db, 1)
    env = cli_env(database_url, poll_interval_ms=200, coding_job_duration_ms=3000)
    cli = workers.start(env, shutdown_timeout_ms=10_000)
    cli.wait_for_line(rf'"Coding job started.*"job_id":"{job_id}"', BOOT_S)

    # When the signal comes (SIGINT as a terminal's Ctrl-C sends it: to the whole process group)
    if signum is signal.SIGINT:
        cli.signal_group(signum)
    else:
        cli.send(signum)
    code = cli.wait(10 + STOP_MARGIN_S)

    # Then the job finished, and the worker exited cleanly
    assert code == 0, cli.tail()
    row = job_rows(db)[job_id]
    assert row["status"] == "completed", row
    finished = _first_index(cli, rf'"Coding job finished.*"job_id":"{job_id}"')
    assert -1 < finished < _first_index(cli, SHUT_DOWN), cli.tail()
    assert "Traceback" not in cli.output and "KeyboardInterrupt" not in cli.output


def test_a_job_longer_than_the_timeout_is_handed_back_within_the_deadline(
    db: Rows, database_url: str, workers: WorkerProcesses
) -> None:
    # Given a 30-second job in progress and a 2-second shutdown timeout
    [job_id] = insert_edge_jobs(db, 1)
    env = cli_env(database_url, poll_interval_ms=200, coding_job_duration_ms=30_000)
    cli = workers.start(env, shutdown_timeout_ms=2000)
    cli.wait_for_line(rf'"Coding job started.*"job_id":"{job_id}"', BOOT_S)

    # When SIGTERM comes
    code, elapsed_s = cli.stop(signal.SIGTERM, 2 + STOP_MARGIN_S)

    # Then the exit came within the timeout plus the margin, with a warning that names the job
    assert code == 0, cli.tail()
    assert elapsed_s <= 2 + STOP_MARGIN_S
    cli.wait_for_line(rf"(?i)warning.*{job_id}", 1)
    # and the job is back in the queue, or left to its lease for the rescue, never completed or lost
    row = job_rows(db)[job_id]
    assert row["status"] in ("pending", "processing"), row
    if row["status"] == "processing":
        assert row["lease_in_future"], row
    else:
        assert row["claim_token"] is None and row["retry_count"] == 0, row
    assert _first_index(cli, rf'"Coding job finished.*"job_id":"{job_id}"') == -1


def _start_with_a_prefetched_job(
    db: Rows, database_url: str, workers: WorkerProcesses
) -> tuple[CliProcess, str, int]:
    """One thread busy with a 2-second job and more jobs waiting: (the CLI, the running job, jobs held)."""
    insert_edge_jobs(db, 4)
    env = cli_env(
        database_url, poll_interval_ms=200, coding_job_duration_ms=2000, log_level="debug", claim_ahead_jobs=1
    )
    cli = workers.start(env, threads=1, shutdown_timeout_ms=10_000)
    _, started = cli.wait_for_line(r'"Coding job started', BOOT_S)
    running_job = re.search(r'"job_id":"([0-9a-f-]+)"', started)
    assert running_job is not None
    # Dramatiq prefetches twice the thread count: the running job and one more.
    held = wait_until(lambda: _processing(db) if _processing(db) >= 2 else 0, 5, message="a job prefetched")
    return cli, running_job.group(1), held


def test_prefetched_jobs_go_back_to_pending_at_shutdown(
    db: Rows, database_url: str, workers: WorkerProcesses
) -> None:
    # Given one thread busy with a job and another job prefetched behind it (CLAIM_AHEAD_JOBS=1)
    cli, running_job, _ = _start_with_a_prefetched_job(db, database_url, workers)

    # When SIGTERM comes
    code, _ = cli.stop(signal.SIGTERM, 10 + STOP_MARGIN_S)

    # Then the running job finished and every other job is pending again, untouched
    assert code == 0, cli.tail()
    rows = job_rows(db)
    assert rows.pop(running_job)["status"] == "completed"
    assert len(rows) == 3
    for row in rows.values():
        assert row["status"] == "pending", row
        assert row["locked_by"] is None and row["claim_token"] is None and row["lease_expires_at"] is None
        assert row["retry_count"] == 0 and row["error_message"] is None
    cli.wait_for_line(RELEASED, 1)


def test_shutdown_stops_claiming_first_and_logs_each_step(
    db: Rows, database_url: str, workers: WorkerProcesses
) -> None:
    # Given one thread busy with a job and another job prefetched behind it (CLAIM_AHEAD_JOBS=1)
    cli, _, held = _start_with_a_prefetched_job(db, database_url, workers)

    # When SIGTERM comes
    code, _ = cli.stop(signal.SIGTERM, 10 + STOP_MARGIN_S)
    assert code == 0, cli.tail()

    # Then each step was logged, in order: stop claiming, wait for the job, release the rest, shut down
    steps = [_first_index(cli, step) for step in (STOP_CLAIMING, WAITING_FOR_JOBS, RELEASED, SHUT_DOWN)]
    assert -1 not in steps, f"steps found at lines {steps} (-1: not logged); output:\n{cli.output}"
    assert steps == sorted(steps), f"steps out of order: {steps}"
    # and nothing was claimed after the signal: only the job held behind the running one was released
    released = [int(m.group(1)) for line in cli.lines if (m := re.search(RELEASED, line))]
    assert sum(released) == held - 1, cli.output


def test_a_killed_worker_process_stops_the_cli_and_its_jobs_are_rescued_without_spending_retries(
    db: Rows, database_url: str, workers: WorkerProcesses
) -> None:
    # Given two worker processes, each holding a long job and a prefetched one
    job_ids = insert_edge_jobs(db, 6)
    env = cli_env(database_url, poll_interval_ms=200, coding_job_duration_ms=30_000, claim_ahead_jobs=1)
    cli = workers.start(env, processes=2, threads=1, shutdown_timeout_ms=1000)

    def holders() -> set[str]:
        rows = job_rows(db).values()
        held = {str(row["locked_by"]) for row in rows if row["status"] == "processing"}
        return held if len(held) == 2 and _processing(db) == 4 else set()

    worker_ids = wait_until(holders, BOOT_S, message="both processes holding two jobs")
    victim = sorted(worker_ids)[0]
    victim_pid = pid_of_worker_id(victim)
    assert victim_pid in cli.child_pids()
    victims = [job_id for job_id, row in job_rows(db).items() if row["locked_by"] == victim]
    assert len(victims) == 2

    # When one worker process is killed outright
    os.kill(victim_pid, signal.SIGKILL)
    code = cli.wait(1 + 1 + STOP_MARGIN_S + 5)

    # Then the CLI stopped the other one and exited non-zero, so a restart policy brings it back
    assert code != 0, cli.tail()
    cli.wait_for_line(r"exited unexpectedly", 1)
    # and no job was lost or failed: the survivor handed its jobs back
    rows = job_rows(db)
    assert set(rows) == set(job_ids)
    assert [row for row in rows.values() if row["status"] in ("completed", "failed")] == []
    survivors = [row for job_id, row in rows.items() if job_id not in victims]
    assert {row["status"] for row in survivors} == {"pending"}

    # And the killed process's jobs are rescued within seconds (by the survivor before it left, or by the
    # restarted worker at start-up), counting a rescue, never a retry: not after a lease of a minute
    workers.start(env, processes=1, threads=1, shutdown_timeout_ms=1000)

    def rescued() -> list[dict[str, object]]:
        rows = [job_rows(db)[job_id] for job_id in victims]
        return rows if all(row["rescue_count"] == 1 and row["locked_by"] != victim for row in rows) else []

    for row in wait_until(rescued, RESCUE_S, message="the killed worker's jobs to be rescued"):
        assert row["retry_count"] == 0, row
        assert row["status"] in ("pending", "processing"), row
