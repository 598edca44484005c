"""The real `dramatiq tasks` CLI behind a real PgBouncer (issue 12's "done when"), with no pooler setting.

Transaction mode (Supavisor's port 6543): every job runs once, with no prepared-statement error, an idle
worker finds a new job without LISTEN, and nothing stays behind on the pooled connections after it stops.
Session mode (port 5432) with a pool of 10: two containers share it. A pool with no free connection: the
worker says why within seconds instead of waiting silently.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from broker.postgres import PostgresTransport
from service.budget import container_connections
from tests.support.actors import declare_test_actors
from tests.support.brokers import build_broker
from tests.support.databases import DatabaseServer
from tests.support.pgbouncer import SESSION, TRANSACTION, leftovers, pooled_sessions, running_pgbouncer
from tests.support.processes import (
    Rows,
    WorkerProcesses,
    cli_env,
    free_port,
    insert_edge_jobs,
    job_rows,
    status_counts,
    wait_until,
)

pytestmark = pytest.mark.slow

#: Seconds for a CLI to boot, and to stop after SIGTERM when no job runs.
BOOT_S = 30.0
STOP_S = 20.0
#: Seconds the jobs of a test may take to complete.
JOBS_S = 60.0
#: Seconds an idle worker may take to find a new job: far less than the default POLL_INTERVAL_MS (10 s).
IDLE_PICKUP_S = 5.0
#: Seconds a worker that gets no database connection may stay silent about it.
SILENT_AT_MOST_S = 20.0
#: The test actors' module; under the CLI its actors record each run in public.test_runs.
TEST_ACTORS = "tests.support.actors"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerProcesses]:
    with WorkerProcesses(tmp_path) as started:
        yield started


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def default_statement_timeout(db: Rows) -> str:
    row = db.execute("select current_setting('statement_timeout') as value").fetchone()
    assert row is not None
    return str(row["value"])


def test_a_worker_behind_a_transaction_pooler_runs_every_job_once(
    database_server: DatabaseServer, database_url: str, db: Rows, workers: WorkerProcesses
) -> None:
    with running_pgbouncer(database_server.admin_url, mode=TRANSACTION) as bouncer:
        url = bouncer.url(database_url)
        # Given the worker as the image runs it at scale (2 processes x 4 threads), through the transaction
        # pooler, with no pooler setting and the default poll interval
        env = cli_env(url, coding_job_duration_ms=0)
        cli = workers.start(env, TEST_ACTORS, processes=2, threads=4)
        cli.wait_for_lines(r"Worker process is ready for action", 2, BOOT_S)

        # When jobs arrive from the Edge Function and from a producer that goes through the pooler too
        coding_jobs = insert_edge_jobs(db, 150)
        producer = build_broker(PostgresTransport(url, pool_size=2))
        actors = declare_test_actors(producer)
        try:
            keys = [f"job-{n}" for n in range(150)]
            for key in keys:
                actors.record.send(key)
        finally:
            producer.close()
        wait_until(lambda: status_counts(db).get("completed", 0) >= 300, JOBS_S, message="300 jobs done")

        # And, once idle, a new row arrives
        time.sleep(2)
        [late] = insert_edge_jobs(db, 1)
        wait_until(
            lambda: job_rows(db)[late]["status"] == "completed", IDLE_PICKUP_S, message="the late job done"
        )
        code, _ = cli.stop(signal.SIGTERM, STOP_S)

        # Then every job completed the first time, each ran once, and nothing failed on a prepared statement
        assert code == 0, cli.tail()
        rows = job_rows(db)
        assert len(rows) == 301
        assert {row["status"] for row in rows.values()} == {"completed"}
        assert {row["retry_count"] for row in rows.values()} == {0}
        assert set(coding_jobs) <= set(rows)
        runs = db.execute(
            "select run_key, count(*) as runs from public.test_runs where actor_name = 'record' group by 1"
        ).fetchall()
        assert {row["run_key"]: row["runs"] for row in runs} == dict.fromkeys(keys, 1)
        assert "prepared statement" not in cli.output
        assert "no session state" in cli.output  # the one line that says it polls

        # And no pooled server connection keeps a LISTEN, a lock, a setting or a prepared statement
        assert leftovers(pooled_sessions(bouncer, database_url), default_statement_timeout(db)) == []


def test_two_containers_share_a_ten_connection_session_pool(
    database_server: DatabaseServer, database_url: str, db: Rows, workers: WorkerProcesses, tmp_path: Path
) -> None:
    # The containers (2 processes x 4 threads), with the budget's setting for a small session pool:
    # one pooled connection per worker process, so a container holds 2 x (1 + LISTEN) + health = 5
    processes, threads, pool_size = 2, 4, 1
    assert 2 * container_connections(processes, threads, listen=True, pool_size=pool_size) <= 10

    with running_pgbouncer(database_server.admin_url, mode=SESSION, pool_size=10) as bouncer:
        url = bouncer.url(database_url)
        # Given two containers on one session-mode pooler with a pool of 10
        ports = [free_port(), free_port()]
        clis = []
        for index, port in enumerate(ports):
            env = cli_env(
                url,
                coding_job_duration_ms=300,
                database_pool_size=pool_size,
                health_check_port=port,
                run_dir=tmp_path / f"run-{index}",
            )
            clis.append(workers.start(env, processes=processes, threads=threads))
        for cli, port in zip(clis, ports, strict=True):
            cli.wait_for_lines(r"Worker process is ready for action", processes, BOOT_S)
            wait_until(lambda port=port: http_status(port, "/ready") == 200, BOOT_S, message="/ready 200")

        # When jobs arrive, while the pool's waiting clients are watched
        waiting: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                pools = [p for p in bouncer.show("pools") if p["database"] == db.info.dbname]
                waiting.append(sum(int(p["cl_waiting"]) for p in pools))
                stop.wait(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            insert_edge_jobs(db, 32)
            wait_until(lambda: status_counts(db).get("completed", 0) >= 32, JOBS_S, message="32 jobs done")
            # Then both containers stay ready
            assert [http_status(port, "/ready") for port in ports] == [200, 200]
        finally:
            stop.set()
            watcher.join()

        # And both worked, every job once, and no client ever waited for a server connection
        holders = {int(str(row["locked_by"]).rsplit(":", 2)[1]) for row in job_rows(db).values()}
        assert all(holders & set(cli.child_pids()) for cli in clis), holders
        assert {row["retry_count"] for row in job_rows(db).values()} == {0}
        assert max(waiting) == 0, waiting
        for cli in clis:
            code, _ = cli.stop(signal.SIGTERM, STOP_S)
            assert code == 0, cli.tail()


def test_a_worker_that_gets_no_connection_says_why_within_seconds(
    database_server: DatabaseServer, database_url: str, workers: WorkerProcesses
) -> None:
    with running_pgbouncer(database_server.admin_url, mode=SESSION, pool_size=2) as bouncer:
        url = bouncer.url(database_url)
        # Given a session-mode pooler whose every server connection another client holds
        holders = [psycopg.connect(url, autocommit=True) for _ in range(2)]
        try:
            for holder in holders:
                holder.execute("select 1")

            # When a worker starts
            started = time.monotonic()
            cli = workers.start(cli_env(url), processes=1, threads=1)

            # Then it says why it cannot work within seconds, and stops for the restart policy to try again
            says_why = r"answered nothing within .* server connections are all taken"
            cli.wait_for_line(says_why, SILENT_AT_MOST_S)
            assert time.monotonic() - started < SILENT_AT_MOST_S
            assert cli.wait(STOP_S) != 0
        finally:
            for holder in holders:
                holder.close()
