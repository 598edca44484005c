"""The Falcon health app against a real database and real heartbeat files: /health, /ready, /metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from falcon import testing
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from broker.errors import ConnectionClosed
from broker.postgres import PostgresTransport
from broker.transport import QueueStat, Transport
from health.app import create_app
from health.job_counters import DURATION_BOUNDS_S, ActorJobStats
from health.monitor import QueueMonitor
from health.readiness import ReadinessProbe
from health.run_folder import WorkerBeat, process_start, write_beat
from health.runtime import build_runtime
from health.stats_cache import StatsCache
from service.settings import load_settings
from tests.support.databases import DatabaseServer
from tests.support.postgrest import running_postgrest
from tests.support.processes import Rows, insert_edge_jobs, with_credentials

if TYPE_CHECKING:
    from loguru import Record

#: The liveness window of these tests, in milliseconds.
WINDOW_MS = 3_000
#: The readiness timeout of these tests, in milliseconds.
READY_MS = 500
#: A password the responses must never show.
SECRET = "Hunter2-secret-pw"


# -- helpers -----------------------------------------------------------------------------------------------
def beat(
    run_dir: Path,
    *,
    pid: int | None = None,
    heartbeat_age_s: float = 0.0,
    jobs: Sequence[ActorJobStats] = (),
    in_progress: int = 0,
    start: str | None = "own",
    master_pid: int | None = None,
) -> WorkerBeat:
    """Write a heartbeat file as a worker process would; `pid` defaults to this (live) test process."""
    pid = os.getpid() if pid is None else pid
    now = time.time()
    written = WorkerBeat(
        pid=pid,
        worker_id=f"test-host:{pid}:abc123",
        process_start=process_start(pid) if start == "own" else start,
        started_at=now - 60,
        heartbeat_at=now - heartbeat_age_s,
        written_at=now,
        state="running",
        jobs_in_progress=in_progress,
        jobs_processed=sum(job.processed for job in jobs),
        jobs=tuple(jobs),
        duration_bounds_s=DURATION_BOUNDS_S,
        master_pid=master_pid,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_beat(run_dir, written)
    return written


def exited_pid() -> int:
    """The pid of a real child process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=10)
    return child.pid


def client_for(
    run_dir: Path,
    transport: Transport,
    *,
    cache_ms: int = 0,
    ready_ms: int = READY_MS,
    master_pid: int | None = None,
) -> testing.TestClient:
    app = create_app(
        run_dir=run_dir,
        heartbeat_stale_ms=WINDOW_MS,
        probe=ReadinessProbe(transport, ready_ms),
        cache=StatsCache(transport, cache_ms, wait_ms=ready_ms),
        master_pid=master_pid,
    )
    return testing.TestClient(app)


def metrics(client: testing.TestClient) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> sorted labels -> value, parsed by prometheus-client's own parser."""
    result = client.simulate_get("/metrics")
    assert result.status_code == 200
    assert result.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(result.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def claim_and_complete(db: Rows, count: int) -> None:
    claimed = db.execute(
        "select id, claim_token from public.claim_jobs('test-worker', 'default', %s, 60000)", (count,)
    ).fetchall()
    for row in claimed:
        db.execute("select public.complete_job(%s, %s)", (row["id"], row["claim_token"]))


class OutageTransport(PostgresTransport):
    """The real transport, except that get_queue_stats() finds the database gone at once.

    The real driver would wait out its pool timeout first; what is tested here is what the health app does
    with a failed read, not how the driver notices.
    """

    def stats(self) -> list[QueueStat]:
        raise ConnectionClosed(OSError("connection refused"))  # type: ignore[no-untyped-call]


class CountingTransport(PostgresTransport):
    """The real transport, counting get_queue_stats() reads (the database is not what is tested here)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, pool_size=2)
        self.stats_reads = 0

    def stats(self) -> list[QueueStat]:
        self.stats_reads += 1
        return super().stats()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def pg_transport(database_url: str) -> Iterator[PostgresTransport]:
    transport = PostgresTransport(database_url, pool_size=2)
    yield transport
    transport.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word: a database that hangs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- /health ---------------------------------------------------------------------------------------------
def test_health_is_healthy_with_a_fresh_heartbeat(run_dir: Path, pg_transport: PostgresTransport) -> None:
    # Given a live worker process that ticked just now, with one job running
    beat(run_dir, in_progress=1)
    client = client_for(run_dir, pg_transport)

    # When the orchestrator asks
    result = client.simulate_get("/health")

    # Then it is healthy, with the worker's state
    assert result.status_code == 200, result.text
    body = result.json
    assert body["status"] == "healthy"
    assert isinstance(body["uptime"], float) and body["uptime"] >= 0
    assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    [worker] = body["workers"]
    assert worker["pid"] == os.getpid()
    assert worker["alive"] is True
    assert worker["jobs_in_progress"] == 1
    assert datetime.fromisoformat(worker["last_heartbeat"]).timestamp() == pytest.approx(time.time(), abs=5)
    assert "reason" not in body
    assert result.headers["cache-control"] == "no-store"


def test_health_names_a_worker_whose_consumer_stopped_ticking(
    run_dir: Path, pg_transport: PostgresTransport
) -> None:
    # Given a live process whose last tick is older than the window
    beat(run_dir, heartbeat_age_s=WINDOW_MS / 1000 + 5)

    result = client_for(run_dir, pg_transport).simulate_get("/health")

    assert result.status_code == 503
    assert result.json["status"] == "unhealthy"
    assert f"worker process {os.getpid()} has not ticked" in result.json["reason"]
    assert result.json["workers"][0]["alive"] is True


def test_health_names_a_dead_worker_process(run_dir: Path, pg_transport: PostgresTransport) -> None:
    # Given one healthy worker and the file of a process that has exited (a SIGKILLed worker leaves one)
    beat(run_dir)
    dead = exited_pid()
    beat(run_dir, pid=dead, start=None)

    result = client_for(run_dir, pg_transport).simulate_get("/health")

    assert result.status_code == 503
    assert f"worker process {dead} is dead" in result.json["reason"]
    by_pid = {worker["pid"]: worker for worker in result.json["workers"]}
    assert by_pid[dead]["alive"] is False
    assert by_pid[os.getpid()]["alive"] is True


def test_a_reused_pid_is_not_mistaken_for_the_worker(run_dir: Path, pg_transport: PostgresTransport) -> None:
    # Given a file whose pid now belongs to another process (ours) that started at another time
    beat(run_dir, start="1")

    result = client_for(run_dir, pg_transport).simulate_get("/health")

    assert result.status_code == 503
    assert "is dead" in result.json["reason"]


def test_the_fork_judges_only_its_own_dramatiq_tree(run_dir: Path, pg_transport: PostgresTransport) -> None:
    # Given a run folder shared by two dramatiq runs: ours (a fresh worker) and another (a stale one)
    ours, theirs = os.getppid(), os.getpid()
    beat(run_dir, pid=os.getppid(), master_pid=ours)
    beat(run_dir, heartbeat_age_s=60, jobs=[ActorJobStats("default", "a", processed=7)], master_pid=theirs)

    # When the health server of our run is asked
    client = client_for(run_dir, pg_transport, master_pid=ours)
    result = client.simulate_get("/health")

    # Then only our worker counts, in /health and in /metrics
    assert result.status_code == 200, result.text
    assert [worker["pid"] for worker in result.json["workers"]] == [os.getppid()]
    assert "worker_jobs_processed_total" not in metrics(client)


def test_health_without_heartbeat_files_says_so(run_dir: Path, pg_transport: PostgresTransport) -> None:
    result = client_for(run_dir, pg_transport).simulate_get("/health")

    assert result.status_code == 503
    assert result.json["status"] == "unhealthy"
    assert "no worker heartbeat files" in result.json["reason"]
    assert result.json["workers"] == []


def test_a_database_outage_fails_readiness_not_liveness(
    database_server: DatabaseServer, run_dir: Path
) -> None:
    # Given a healthy worker and a transport whose database does not exist
    beat(run_dir)
    transport = PostgresTransport(database_server.url_for("no_such_database_for_health"), pool_size=1)
    try:
        client = client_for(run_dir, transport)

        # Then the database's outage shows on /ready only
        ready = client.simulate_get("/ready")
        health = client.simulate_get("/health")
    finally:
        transport.close()
    assert ready.status_code == 503
    assert ready.json["status"] == "not ready"
    assert "unreachable" in ready.json["reason"]
    assert health.status_code == 200, health.text


# -- /ready ----------------------------------------------------------------------------------------------
def test_ready_when_the_database_answers(run_dir: Path, pg_transport: PostgresTransport) -> None:
    result = client_for(run_dir, pg_transport).simulate_get("/ready")

    assert result.status_code == 200, result.text
    assert result.json["status"] == "ready"
    assert result.json["latency_ms"] < READY_MS


def test_ready_gives_up_at_the_timeout_when_the_database_hangs(run_dir: Path, silent_server: int) -> None:
    # Given a "database" that accepts the connection and never answers
    transport = PostgresTransport(f"postgresql://postgres@127.0.0.1:{silent_server}/postgres", pool_size=1)
    client = client_for(run_dir, transport)

    # When readiness is probed
    started = time.monotonic()
    result = client.simulate_get("/ready")
    elapsed_s = time.monotonic() - started

    # Then it answers 503 at the timeout, not when the driver gives up
    assert result.status_code == 503
    assert f"did not answer within {READY_MS} ms" in result.json["reason"]
    assert READY_MS / 1000 <= elapsed_s < READY_MS / 1000 + 1.0


# -- /metrics --------------------------------------------------------------------------------------------
def test_metrics_show_queue_depth_and_job_counts(
    db: Rows, run_dir: Path, pg_transport: PostgresTransport
) -> None:
    # Given three jobs inserted, one claimed; and two worker processes' counts in their heartbeat files
    insert_edge_jobs(db, 3)
    db.execute("select * from public.claim_jobs('test-worker', 'default', 1, 60000)")
    first = ActorJobStats("default", "run_coding_job", processed=3, failed=1, retried=2)
    first.observe(0.05)
    first.observe(2.0)
    second = ActorJobStats("default", "run_coding_job", processed=2)
    second.observe(7.0)
    beat(run_dir, jobs=[first], in_progress=1)
    beat(run_dir, pid=os.getppid(), jobs=[second])

    samples = metrics(client_for(run_dir, pg_transport))

    # Then depth comes from get_queue_stats(), with empty statuses as zeros
    depth = samples["queue_jobs"]
    assert depth[(("queue", "default"), ("status", "pending"))] == 2
    assert depth[(("queue", "default"), ("status", "processing"))] == 1
    assert depth[(("queue", "default"), ("status", "completed"))] == 0
    assert depth[(("queue", "default"), ("status", "failed"))] == 0
    assert depth[(("queue", "default"), ("status", "cancelled"))] == 0
    assert samples["queue_stats_up"][()] == 1
    # And the counts are summed over the worker processes
    labels = (("actor", "run_coding_job"), ("queue", "default"))
    assert samples["worker_jobs_processed_total"][labels] == 5
    assert samples["worker_jobs_failed_total"][labels] == 1
    assert samples["worker_jobs_retried_total"][labels] == 2
    assert samples["worker_processes"][()] == 2
    assert samples["worker_jobs_in_progress"][()] == 1
    buckets = samples["worker_job_duration_seconds_bucket"]
    assert buckets[(("actor", "run_coding_job"), ("le", "0.1"), ("queue", "default"))] == 1
    assert buckets[(("actor", "run_coding_job"), ("le", "2.5"), ("queue", "default"))] == 2
    assert buckets[(("actor", "run_coding_job"), ("le", "+Inf"), ("queue", "default"))] == 3
    assert samples["worker_job_duration_seconds_count"][labels] == 3
    assert samples["worker_job_duration_seconds_sum"][labels] == pytest.approx(9.05)


def test_metrics_read_the_queue_stats_through_the_cache(db: Rows, database_url: str, run_dir: Path) -> None:
    # Given a cache that keeps one read for a minute
    transport = CountingTransport(database_url)
    try:
        insert_edge_jobs(db, 1)
        client = client_for(run_dir, transport, cache_ms=60_000)
        first = metrics(client)

        # When more jobs arrive and the probes keep scraping
        insert_edge_jobs(db, 2)
        later = [metrics(client) for _ in range(5)]
    finally:
        transport.close()

    # Then one read served them all
    pending = (("queue", "default"), ("status", "pending"))
    assert first["queue_jobs"][pending] == 1
    assert all(sample["queue_jobs"][pending] == 1 for sample in later)
    assert transport.stats_reads == 1


def test_metrics_when_the_database_is_down(database_url: str, run_dir: Path) -> None:
    transport = OutageTransport(database_url, pool_size=1)
    try:
        samples = metrics(client_for(run_dir, transport))
    finally:
        transport.close()

    assert samples["queue_stats_up"][()] == 0
    assert "queue_jobs" not in samples


def test_metrics_answer_on_time_when_the_database_hangs(run_dir: Path, silent_server: int) -> None:
    # Given a "database" that accepts connections and never answers
    transport = PostgresTransport(f"postgresql://postgres@127.0.0.1:{silent_server}/postgres", pool_size=1)
    try:
        client = client_for(run_dir, transport)

        # When Prometheus scrapes
        started = time.monotonic()
        samples = metrics(client)
        elapsed_s = time.monotonic() - started
    finally:
        transport.close()

    # Then the scrape says the stats are missing, at the deadline rather than at the driver's pool timeout
    assert samples["queue_stats_up"][()] == 0
    assert elapsed_s < READY_MS / 1000 + 1.0


# -- errors and secrets ----------------------------------------------------------------------------------
def test_unknown_paths_and_wrong_methods_answer_json(run_dir: Path, pg_transport: PostgresTransport) -> None:
    client = client_for(run_dir, pg_transport)

    missing = client.simulate_get("/nope", headers={"Accept": "text/html"})
    wrong = client.simulate_post("/health", headers={"Accept": "application/xml"})

    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert missing.json["title"] == "404 Not Found"
    assert wrong.status_code == 405
    assert wrong.headers["content-type"] == "application/json"
    assert wrong.json["title"] == "405 Method Not Allowed"
    assert "GET" in wrong.headers["allow"]


@pytest.mark.parametrize("reachable", [True, False], ids=["database-up", "database-down"])
def test_no_response_contains_a_secret(database_url: str, run_dir: Path, reachable: bool) -> None:
    # Given a DATABASE_URL with a password (trust authentication ignores it, so the database still answers)
    url = with_credentials(database_url, "postgres", SECRET)
    if not reachable:
        url = url.replace(":5432/", f":{unused_port()}/")
    transport = PostgresTransport(url, pool_size=1)
    try:
        beat(run_dir, heartbeat_age_s=60)
        beat(run_dir, pid=exited_pid(), start=None)
        client = client_for(run_dir, transport)
        results = [client.simulate_get(path) for path in ("/health", "/ready", "/metrics", "/nope")]
        results.append(client.simulate_delete("/ready"))
    finally:
        transport.close()

    # Then no status, header or body shows the password or the URL
    for result in results:
        seen = result.text + json.dumps(dict(result.headers))
        assert SECRET not in seen
        assert "postgresql://" not in seen
    assert results[1].status_code == (200 if reachable else 503)


# -- the runtime and the queue monitor -------------------------------------------------------------------
def test_the_runtime_wires_the_app_from_settings(database_url: str, run_dir: Path) -> None:
    settings = load_settings(
        _env_file=None, database_url=database_url, run_dir=run_dir, heartbeat_stale_ms=WINDOW_MS
    )
    beat(run_dir)
    runtime = build_runtime(settings)
    try:
        client = testing.TestClient(runtime.app)
        assert client.simulate_get("/health").status_code == 200
        assert client.simulate_get("/ready").status_code == 200
        assert metrics(client)["queue_stats_up"][()] == 1
    finally:
        runtime.close()


@pytest.fixture
def log_records() -> Iterator[list[Record]]:
    records: list[Record] = []
    sink = logger.add(lambda message: records.append(message.record), level="DEBUG", format="{message}")
    yield records
    logger.remove(sink)


def test_the_monitor_logs_counts_oldest_pending_and_rate(
    db: Rows, pg_transport: PostgresTransport, log_records: list[Record]
) -> None:
    # Given four jobs, waiting
    insert_edge_jobs(db, 4)
    monitor = QueueMonitor(StatsCache(pg_transport, 0), interval_ms=30_000)

    # When the monitor logs, two jobs complete, and it logs again
    first = monitor.log_once()
    claim_and_complete(db, 2)
    time.sleep(0.05)
    second = monitor.log_once()

    # Then each line has the counts, the oldest pending job's age and (from the second on) a rate
    assert first is not None and second is not None
    assert first.totals == {"pending": 4, "processing": 0, "completed": 0, "failed": 0, "cancelled": 0}
    assert first.jobs_per_minute is None
    assert second.queues == {
        "default": {"pending": 2, "processing": 0, "completed": 2, "failed": 0, "cancelled": 0}
    }
    assert second.jobs_per_minute is not None and second.jobs_per_minute > 0
    assert second.oldest_pending_age_s is not None and 0 <= second.oldest_pending_age_s < 60
    lines = [record for record in log_records if record["extra"].get("event") == "queue_stats"]
    assert len(lines) == 2
    assert lines[1]["extra"]["completed"] == 2
    assert json.loads(lines[1]["extra"]["queues"]) == second.queues
    assert lines[1]["extra"]["jobs_per_minute"] == second.jobs_per_minute
    assert "2 pending" in lines[1]["message"]


def test_a_queue_with_pending_jobs_and_no_consumer_is_reported(
    db: Rows, run_dir: Path, pg_transport: PostgresTransport, log_records: list[Record]
) -> None:
    # Given a worker that consumes "default", and jobs in "default" and in a queue nobody consumes (a typo)
    db.execute("select public.register_worker('w1', 'heartbeat', 60000, 'h', 1, '{default}')")
    insert_edge_jobs(db, 1)
    db.execute("insert into public.coding_jobs (prompt, queue_name) values ('lost', 'defualt')")

    # Then the monitor warns about that queue, by name, and /metrics shows it with no consumer
    summary = QueueMonitor(StatsCache(pg_transport, 0), interval_ms=30_000).log_once()
    assert summary is not None and summary.unconsumed == ("defualt",)
    [warning] = [
        r for r in log_records if r["level"].name == "WARNING" and "no worker consumes" in r["message"]
    ]
    assert "'defualt' has 1 pending job(s)" in warning["message"]
    consumers = metrics(client_for(run_dir, pg_transport))["queue_consumers"]
    assert consumers[(("queue", "defualt"),)] == 0 and consumers[(("queue", "default"),)] == 1


def test_metrics_and_the_monitor_show_what_operators_alert_on(
    db: Rows, run_dir: Path, pg_transport: PostgresTransport, log_records: list[Record]
) -> None:
    # Given a job that fell due two minutes ago, one delayed into the future (created long ago), a paused
    # queue, and jobs of two actors
    db.execute(
        "insert into public.coding_jobs (prompt, run_at, created_at) values"
        " ('due', now() - interval '2 minutes', now() - interval '3 minutes'),"
        " ('delayed', now() + interval '1 hour', now() - interval '1 day')"
    )
    db.execute(
        "insert into public.coding_jobs (prompt, queue_name, actor_name) values ('x', 'mail', 'send_mail')"
    )
    db.execute("select * from public.pause_queue('mail', 'provider outage')")

    samples = metrics(client_for(run_dir, pg_transport))
    summary = QueueMonitor(StatsCache(pg_transport, 0), interval_ms=30_000).log_once()

    # Then the wait counts from when the due job fell due, and the delayed job does not count
    wait = samples["queue_oldest_pending_wait_seconds"]
    assert 110 <= wait[(("queue", "default"),)] < 200
    assert summary is not None and summary.oldest_pending_age_s is not None
    assert 110 <= summary.oldest_pending_age_s < 200
    # jobs per actor and status, a counter of transitions, and the paused queue
    actors = samples["queue_actor_jobs"]
    assert actors[(("actor", "run_coding_job"), ("queue", "default"), ("status", "pending"))] == 2
    assert actors[(("actor", "send_mail"), ("queue", "mail"), ("status", "pending"))] == 1
    assert (
        samples["queue_job_transitions_total"][
            (("actor", "send_mail"), ("queue", "mail"), ("status", "pending"))
        ]
        == 1
    )
    assert samples["queue_paused"] == {(("queue", "default"),): 0, (("queue", "mail"),): 1}
    assert summary.paused == ("mail",)
    assert summary.actors == {
        "default": {"run_coding_job": {"pending": 2}},
        "mail": {"send_mail": {"pending": 1}},
    }
    [line] = [r for r in log_records if r["extra"].get("event") == "queue_stats"]
    assert "paused: mail" in line["message"] and line["extra"]["paused_queues"] == "mail"


def test_the_monitor_reports_an_unreachable_database(database_url: str, log_records: list[Record]) -> None:
    transport = OutageTransport(database_url, pool_size=1)
    try:
        summary = QueueMonitor(StatsCache(transport, 0), interval_ms=30_000).log_once()
    finally:
        transport.close()

    assert summary is None
    [line] = [record for record in log_records if record["extra"].get("event") == "queue_stats"]
    assert line["level"].name == "WARNING"
    assert "unavailable" in line["message"]


def test_readiness_and_metrics_over_rest(db: Rows, database_url: str, run_dir: Path) -> None:
    # Given the health app built from settings that select the Supabase REST transport
    insert_edge_jobs(db, 2)
    with running_postgrest(database_url) as endpoint:
        settings = load_settings(
            _env_file=None,
            queue_transport="rest",
            supabase_url=endpoint.url,
            supabase_service_role_key=endpoint.service_role_key,
            run_dir=run_dir,
            heartbeat_stale_ms=WINDOW_MS,
            stats_cache_ms=0,
        )
        beat(run_dir)
        runtime = build_runtime(settings)
        try:
            client = testing.TestClient(runtime.app)
            # Then readiness asks the queue over HTTP, and /metrics shows the depth it read there
            assert client.simulate_get("/ready").status_code == 200
            assert metrics(client)["queue_jobs"][(("queue", "default"), ("status", "pending"))] == 2
            assert endpoint.calls["queue_ping"] >= 1
            assert endpoint.service_role_key not in client.simulate_get("/ready").text
        finally:
            runtime.close()

    # And when the project is unreachable, readiness fails while liveness holds
    runtime = build_runtime(settings)
    try:
        client = testing.TestClient(runtime.app)
        assert client.simulate_get("/ready").status_code == 503
        assert client.simulate_get("/health").status_code == 200
    finally:
        runtime.close()
