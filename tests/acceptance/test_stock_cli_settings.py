"""The settings hold under the stock `dramatiq tasks` CLI, whatever its flags say, and the worker says so.

NOTE FOR THE LEAD: test_max_concurrent_jobs_holds_when_the_cli_starts_more_threads passes only once the
issue-7 broker (claim capacity = MAX_CONCURRENT_JOBS, whatever --threads says) is merged. On branch h10 alone
its start-up line check passes and its "one job at a time" check fails (four jobs run at once).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import Rows, WorkerProcesses, cli_env, status_counts, wait_until

pytestmark = pytest.mark.slow

#: seconds for a CLI to boot, and then to run the test's jobs one after another
BOOT_S = 30.0
#: seconds for a CLI to exit after SIGTERM when no job is running
STOP_S = 15.0
#: Milliseconds each test job runs: long enough that jobs running at once overlap for sure.
JOB_MS = 1_000
#: The test actors' module; under the CLI its actors record each run in public.test_runs.
TEST_ACTORS = "tests.support.actors"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerProcesses]:
    with WorkerProcesses(tmp_path) as started:
        yield started


def most_at_once(db: Rows, actor: str) -> int:
    """The most runs of `actor` that were in progress at the same moment, from their start and end rows."""
    # At a tie, "finished" sorts after "started" (event desc), so touching runs count as overlapping.
    rows = db.execute(
        "select event, ran_at from public.test_runs"
        " where actor_name = %s and event in ('started', 'finished') order by ran_at, event desc",
        (actor,),
    ).fetchall()
    running = peak = 0
    for row in rows:
        running += 1 if row["event"] == "started" else -1
        peak = max(peak, running)
    return peak


def test_max_concurrent_jobs_holds_when_the_cli_starts_more_threads(
    db: Rows, database_url: str, workers: WorkerProcesses
) -> None:
    # Given MAX_CONCURRENT_JOBS=1, and the documented command line asking for 4 threads and another deadline
    env = cli_env(
        database_url,
        app_env="production",
        poll_interval_ms=200,
        max_concurrent_jobs=1,
        worker_processes=1,
        shutdown_timeout_ms=30_000,
    )
    cli = workers.start(env, TEST_ACTORS, processes=1, threads=4, shutdown_timeout_ms=10_000)

    # Then the worker says, in one line at start-up, which flags differ from the settings and what holds
    _, line = cli.wait_for_line(r"differ from the settings", BOOT_S)
    message = json.loads(line)["message"]
    assert "--threads 4" in message and "MAX_CONCURRENT_JOBS=1" in message, message
    assert "--worker-shutdown-timeout 10000" in message and "SHUTDOWN_TIMEOUT_MS=30000" in message, message
    assert "--processes" not in message, message  # that one agrees
    cli.wait_for_line(r"Worker process is ready", BOOT_S)

    # When four jobs arrive at once
    jobs = [{"actor_name": "slow", "args": [f"job-{n}", JOB_MS]} for n in range(4)]
    db.execute("select public.enqueue_jobs(%s::jsonb)", (json.dumps(jobs),))
    wait_until(lambda: status_counts(db).get("completed") == 4, BOOT_S + 4 * JOB_MS / 1000, message="4 done")
    code, _ = cli.stop(signal.SIGTERM, STOP_S)
    assert code == 0, cli.tail()

    # Then they ran one at a time, as MAX_CONCURRENT_JOBS says, not four at once as the threads would allow
    assert most_at_once(db, "slow") == 1
