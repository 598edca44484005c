"""The connection budget (issue 12, finding 4): what each process of a container may open, enforced.

A container's numbers come from service/budget.py; these tests hold the processes to them against a real
database, counting backends in pg_stat_activity while the processes are busy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from falcon import testing

from broker.postgres import PostgresTransport
from health.dashboard.server import build_dashboard
from health.runtime import build_runtime
from service.budget import (
    DASHBOARD_POOL_SIZE,
    HEALTH_POOL_SIZE,
    MULTI_THREAD_WORKER_POOL,
    SINGLE_THREAD_WORKER_POOL,
)
from service.settings import load_settings
from service.transports import DASHBOARD_APPLICATION_NAME, HEALTH_APPLICATION_NAME, build_transport
from tests.support.brokers import Db

#: Probe threads, and requests each makes, while the connections are counted.
PROBE_THREADS = 6
REQUESTS_PER_THREAD = 25
#: Seconds between two counts of the database's backends.
SAMPLE_EVERY_S = 0.005


def backends(db: Db) -> list[str]:
    """The application names of this database's other backends (the test's own connection left out)."""
    rows = db.execute(
        "select application_name from pg_stat_activity"
        " where datname = current_database() and pid <> pg_backend_pid()"
    ).fetchall()
    return [str(row["application_name"]) for row in rows]


def busiest(db: Db, work: Callable[[], None]) -> list[str]:
    """Run `work` while counting backends; returns the largest set of backends seen at one time."""
    done = threading.Event()
    most: list[str] = []

    def sample() -> None:
        nonlocal most
        while not done.is_set():
            seen = backends(db)
            if len(seen) > len(most):
                most = seen
            done.wait(SAMPLE_EVERY_S)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return most


def test_the_health_process_holds_one_connection(database_url: str, db: Db, tmp_path: Path) -> None:
    # Given the health app of a container whose workers run 8 jobs at once
    settings = load_settings(
        _env_file=None, database_url=database_url, run_dir=tmp_path, max_concurrent_jobs=8, stats_cache_ms=0
    )
    runtime = build_runtime(settings)
    client = testing.TestClient(runtime.app)

    def probe() -> None:
        for _ in range(REQUESTS_PER_THREAD):
            assert client.simulate_get("/ready").status_code == 200
            assert client.simulate_get("/metrics").status_code == 200

    def probes() -> None:
        threads = [threading.Thread(target=probe) for _ in range(PROBE_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        # When probes and scrapes arrive together
        most = busiest(db, probes)
    finally:
        runtime.close()

    # Then the health process never held more than its one connection, named as the health server's
    assert most, "the probes must have used the database"
    assert len(most) <= HEALTH_POOL_SIZE, most
    assert set(most) == {HEALTH_APPLICATION_NAME}


def test_a_worker_process_pool_is_sized_by_the_budget(database_url: str) -> None:
    for threads, expected in ((1, SINGLE_THREAD_WORKER_POOL), (4, MULTI_THREAD_WORKER_POOL), (64, 3)):
        settings = load_settings(_env_file=None, database_url=database_url, max_concurrent_jobs=threads)
        transport = build_transport(settings)
        try:
            assert isinstance(transport, PostgresTransport)
            assert transport.calls.pool.max_size == expected, threads
        finally:
            transport.close()


def test_the_dashboard_holds_its_own_two_connections(database_url: str, db: Db, tmp_path: Path) -> None:
    # Given the dashboard of a container whose workers run 8 jobs at once (a worker-sized pool would be 3)
    settings = load_settings(
        _env_file=None,
        database_url=database_url,
        run_dir=tmp_path,
        max_concurrent_jobs=8,
        dashboard_port=8089,
    )
    app, transport = build_dashboard(settings)
    client = testing.TestClient(app)

    def reader() -> None:
        for _ in range(REQUESTS_PER_THREAD // 5):
            assert client.simulate_get("/live").status_code == 200

    def readers() -> None:
        threads = [threading.Thread(target=reader) for _ in range(PROBE_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        # When several tabs refresh at once
        most = busiest(db, readers)
    finally:
        transport.close()

    # Then it never held more than its budget, under its own name (service/budget.py counts it)
    assert most and len(most) <= DASHBOARD_POOL_SIZE, most
    assert set(most) == {DASHBOARD_APPLICATION_NAME}
