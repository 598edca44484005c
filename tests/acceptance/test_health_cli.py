"""The health server as operators run it: in the `dramatiq tasks` process tree, and under the gunicorn CLI.

Real processes, real HTTP, real signals; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from health.job_counters import DURATION_BOUNDS_S
from health.run_folder import WorkerBeat, process_running, process_start, write_beat
from tests.support.databases import DatabaseServer
from tests.support.processes import (
    REPO_ROOT,
    CliProcess,
    Rows,
    WorkerProcesses,
    cli_env,
    insert_edge_jobs,
    iter_json,
    status_counts,
    wait_until,
)

pytestmark = pytest.mark.slow

T = TypeVar("T")

GUNICORN_CLI = Path(sys.executable).parent / "gunicorn"
#: Seconds for a CLI to boot and its health server to answer.
BOOT_S = 30.0
#: Seconds for a CLI to exit after SIGTERM when no job is running.
STOP_S = 15.0
#: The liveness window of the tests that freeze a worker, in milliseconds: small, so they stay quick.
SHORT_WINDOW_MS = 3_000
#: The liveness window of the outage test, in milliseconds. While the database is gone, a consumer iteration
#: can block for the transport's pool timeout (10 s) plus Dramatiq's consumer restart delay (3 s).
OUTAGE_WINDOW_MS = 20_000
#: Seconds the outage test watches /health stay 200: longer than one such blocked iteration.
OUTAGE_WATCH_S = 16.0
#: The liveness window of the sidecar test, whose single heartbeat must stay fresh throughout.
SIDECAR_WINDOW_MS = 600_000
#: Seconds between two probes.
PROBE_STEP_S = 0.25


# -- helpers -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_closed(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) != 0


def get(port: int, path: str, *, timeout_s: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), error.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def get_json(port: int, path: str) -> tuple[int, dict[str, Any]]:
    status, body = get(port, path)
    return status, (json.loads(body) if status else {})


def metric_samples(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    status, body = get(port, "/metrics")
    assert status == 200, body
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def healthy_workers(port: int, count: int) -> list[dict[str, Any]] | None:
    status, body = get_json(port, "/health")
    workers = body.get("workers", [])
    return workers if status == 200 and len(workers) == count else None


def health_env(database_url: str, run_dir: Path, port: int, **settings: int) -> dict[str, str]:
    """Production settings with the health server on `port` and heartbeat files in `run_dir`."""
    values: dict[str, object] = {
        "health_check_port": port,
        "run_dir": run_dir,
        "poll_interval_ms": 200,
        "coding_job_duration_ms": 50,
        "stats_cache_ms": 200,
        "queue_stats_interval_ms": 500,
        "readiness_timeout_ms": 1_000,
        **settings,
    }
    env = cli_env(database_url)
    env.update({name.upper(): str(value) for name, value in values.items()})
    return env


def wait_for(condition: Callable[[], T | None], timeout_s: float, message: str) -> T:
    """The first value of `condition()` that is not None, polled every PROBE_STEP_S until `timeout_s`."""
    value = wait_until(condition, timeout_s, interval_s=PROBE_STEP_S, message=message)
    assert value is not None
    return value


def children(pid: int) -> list[int]:
    """The pids of a process's direct children."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=5, check=False)
    return [int(child) for child in found.stdout.split()]


def assert_all_json(cli: CliProcess) -> None:
    plain = [line for line, parsed in iter_json(cli.lines) if parsed is None and line.strip()]
    assert plain == [], "lines that are not JSON:\n" + "\n".join(plain[:20])


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerProcesses]:
    with WorkerProcesses(tmp_path) as started:
        yield started


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


# -- gunicorn, standalone ----------------------------------------------------------------------------------
def test_gunicorn_run_standalone_serves_the_same_app(
    db: Rows, database_url: str, run_dir: Path, tmp_path: Path
) -> None:
    # Given a worker's heartbeat file (this test process plays the worker) and two waiting jobs
    run_dir.mkdir()
    now = time.time()
    write_beat(
        run_dir,
        WorkerBeat(
            pid=os.getpid(),
            worker_id=f"sidecar-test:{os.getpid()}:000000",
            process_start=process_start(os.getpid()),
            started_at=now,
            heartbeat_at=now,
            written_at=now,
            state="running",
            jobs_in_progress=0,
            jobs_processed=0,
            duration_bounds_s=DURATION_BOUNDS_S,
        ),
    )
    insert_edge_jobs(db, 2)
    port = free_port()
    args = [
        str(GUNICORN_CLI),
        "health.wsgi:app",
        "--bind",
        f"127.0.0.1:{port}",
        "--pythonpath",
        str(REPO_ROOT),
        "--no-control-socket",
        "--logger-class",
        "health.gunicorn_logging.StandaloneGunicornLogger",
        "--graceful-timeout",
        "3",
    ]

    # When the gunicorn CLI runs the app as a sidecar would
    env = health_env(database_url, run_dir, port, heartbeat_stale_ms=SIDECAR_WINDOW_MS)
    server = CliProcess(args, env, tmp_path)
    try:
        wait_until(lambda: get(port, "/health")[0] == 200, BOOT_S, message="/health answering 200")

        # Then it serves /health, /ready, /metrics and JSON errors, like the fork does
        assert get_json(port, "/ready")[0] == 200
        samples = metric_samples(port)
        assert samples["queue_jobs"][(("queue", "default"), ("status", "pending"))] == 2
        missing_status, missing_body = get(port, "/missing")
        assert missing_status == 404 and json.loads(missing_body)["title"] == "404 Not Found"
        # and its queue monitor logs the queue's statistics
        server.wait_for_line(r'"event": ?"queue_stats"', 10)

        # When it is stopped
        code, _ = server.stop(signal.SIGTERM, STOP_S)
    finally:
        server.kill()

    # Then it exits 0 and frees the port; and every line it wrote, gunicorn's own included, was JSON
    assert code == 0, server.tail()
    assert port_closed(port)
    assert_all_json(server)
    server.wait_for_line(r"Listening at", 1)


# -- inside the dramatiq process tree ----------------------------------------------------------------------
def test_the_cli_serves_health_ready_and_metrics_from_its_fork(
    db: Rows, database_url: str, run_dir: Path, workers: WorkerProcesses
) -> None:
    # Given the container's command with two worker processes
    port = free_port()
    cli = workers.launch(health_env(database_url, run_dir, port, worker_processes=2, max_concurrent_jobs=1))

    # Then its health server answers for both processes
    found = wait_for(lambda: healthy_workers(port, 2), BOOT_S, "/health 200 with two workers")
    worker_pids = {worker["pid"] for worker in found}
    assert worker_pids <= set(cli.child_pids())
    assert get_json(port, "/ready")[0] == 200

    # When a job runs
    insert_edge_jobs(db, 1)
    wait_until(lambda: status_counts(db).get("completed") == 1, BOOT_S, message="the job completed")

    # Then /metrics counts it, from the workers' heartbeat files and from the queue's stats
    def counted() -> dict[str, dict[tuple[tuple[str, str], ...], float]] | None:
        samples = metric_samples(port)
        processed = samples.get("worker_jobs_processed_total", {})
        return samples if sum(processed.values()) == 1 else None

    samples = wait_for(counted, 10, "the job counted in /metrics")
    assert samples["queue_jobs"][(("queue", "default"), ("status", "completed"))] == 1
    assert samples["worker_processes"][()] == 2
    assert (
        samples["worker_job_duration_seconds_count"][(("actor", "run_coding_job"), ("queue", "default"))] == 1
    )

    # When something outside the process tree sends SIGTERM to the health server's gunicorn worker
    [arbiter] = [pid for pid in cli.child_pids() if pid not in worker_pids]
    [first_server] = children(arbiter)
    os.kill(first_server, signal.SIGTERM)

    # Then gunicorn replaces its worker, as gunicorn does; the worker service runs on and answers again
    wait_for(lambda: (children(arbiter) or [first_server])[0] != first_server or None, STOP_S, "a new worker")
    wait_for(lambda: healthy_workers(port, 2), BOOT_S, "/health 200 again")
    assert cli.popen.poll() is None, cli.tail()

    # When the CLI is stopped
    code, _ = cli.stop(signal.SIGTERM, STOP_S)

    # Then it exits 0, the health server and the heartbeat files are gone, and every line was JSON
    assert code == 0, cli.tail()
    assert port_closed(port)
    assert list(run_dir.glob("worker-*.json")) == []
    cli.wait_for_line(r"Health server: closing", 1)
    assert_all_json(cli)


def test_the_cli_serves_the_dashboard_from_a_fork_of_its_own_when_asked(
    db: Rows, database_url: str, run_dir: Path, workers: WorkerProcesses
) -> None:
    # Given the container's command with DASHBOARD_PORT set (and no token: a read-only dashboard)
    port, dashboard_port = free_port(), free_port()
    insert_edge_jobs(db, 1)
    db.execute("select * from public.pause_queue('default', 'checking the dashboard')")
    cli = workers.launch(health_env(database_url, run_dir, port, dashboard_port=dashboard_port))
    wait_for(lambda: healthy_workers(port, 1), BOOT_S, "/health 200")

    # Then the dashboard answers on its own port, showing the queue, and refuses actions
    _, page = wait_until(lambda: (found := get(dashboard_port, "/"))[0] == 200 and found, BOOT_S)
    assert "default" in page and "checking the dashboard" in page and "Read-only" in page
    refused = urllib.request.Request(
        f"http://127.0.0.1:{dashboard_port}/actions/resume", data=b"queue=default", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(refused, timeout=5)
    assert error.value.code == 403
    error.value.close()

    # When the CLI is stopped, the dashboard stops with it; every line was JSON
    code, _ = cli.stop(signal.SIGTERM, STOP_S)
    assert code == 0, cli.tail()
    assert port_closed(dashboard_port) and port_closed(port)
    cli.wait_for_line(r"Starting the dashboard", 1)
    assert_all_json(cli)


def test_the_health_server_stays_up_until_the_workers_have_stopped(
    db: Rows, database_url: str, run_dir: Path, workers: WorkerProcesses
) -> None:
    # Given the CLI with a 3-second job in progress
    port = free_port()
    cli = workers.start(
        health_env(database_url, run_dir, port, coding_job_duration_ms=3_000), processes=2, threads=1
    )
    wait_for(lambda: healthy_workers(port, 2), BOOT_S, "/health 200 with two workers")
    insert_edge_jobs(db, 1)

    def busy_pid() -> int | None:
        found = healthy_workers(port, 2) or []
        return next((worker["pid"] for worker in found if worker["jobs_in_progress"] == 1), None)

    busy = wait_for(busy_pid, BOOT_S, "a worker process running the job")

    # When SIGTERM comes, probe the health server until the CLI has exited
    cli.send(signal.SIGTERM)
    probes: list[tuple[bool, int, dict[str, Any]]] = []
    deadline = time.monotonic() + STOP_S
    while cli.popen.poll() is None and time.monotonic() < deadline:
        status, body = get_json(port, "/health")
        # Alive after the answer: the server was meant to be up for the whole request.
        probes.append((process_running(busy, None), status, body))
        time.sleep(0.1)
    code = cli.wait(5)

    # Then the job finished and the exit code is 0
    assert code == 0, cli.tail()
    assert status_counts(db) == {"completed": 1}
    # and the health server answered for as long as the busy worker process lived, calling it healthy
    # while it finished its job, and closed after it
    while_alive = [(status, body) for alive, status, body in probes if alive]
    assert while_alive and all(status != 0 for status, _ in while_alive), probes
    states = {w["state"] for status, body in while_alive if status == 200 for w in body["workers"]}
    assert "stopping" in states, probes
    assert port_closed(port)


def test_a_frozen_worker_process_fails_liveness_until_it_resumes(
    database_url: str, run_dir: Path, workers: WorkerProcesses
) -> None:
    # Given the CLI with two healthy worker processes and a 3-second liveness window
    port = free_port()
    env = health_env(database_url, run_dir, port, heartbeat_stale_ms=SHORT_WINDOW_MS)
    cli = workers.start(env, processes=2, threads=1)
    found = wait_for(lambda: healthy_workers(port, 2), BOOT_S, "/health 200 with two workers")
    frozen = found[0]["pid"]

    # When one worker process is frozen: alive, but making no progress
    os.kill(frozen, signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()

        def unhealthy() -> dict[str, Any] | None:
            status, body = get_json(port, "/health")
            return body if status == 503 else None

        # Then /health answers 503 within the window (plus a heartbeat and a probe), naming that process
        body = wait_for(unhealthy, SHORT_WINDOW_MS / 1000 + 3, "/health 503")
        assert time.monotonic() - frozen_at >= SHORT_WINDOW_MS / 1000 - 1.5
        assert body["status"] == "unhealthy"
        assert f"worker process {frozen} " in body["reason"], body
        assert "stopped" in body["reason"], body
        # and /ready does not care: the database is fine
        assert get_json(port, "/ready")[0] == 200
    finally:
        # When it resumes
        os.kill(frozen, signal.SIGCONT)

    # Then /health answers 200 again
    wait_until(lambda: healthy_workers(port, 2), 5, interval_s=PROBE_STEP_S, message="/health 200 again")
    code, _ = cli.stop(signal.SIGTERM, STOP_S)
    assert code == 0, cli.tail()


def test_a_killed_worker_process_keeps_liveness_failing_until_the_cli_exits(
    database_url: str, run_dir: Path, workers: WorkerProcesses
) -> None:
    # Given the CLI with two healthy worker processes
    port = free_port()
    cli = workers.start(health_env(database_url, run_dir, port), processes=2, threads=1)
    found = wait_for(lambda: healthy_workers(port, 2), BOOT_S, "/health 200 with two workers")
    victim = found[0]["pid"]

    # When one is killed outright (and the kernel has delivered the signal)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not process_running(victim, None), 5, message=f"process {victim} gone")

    # Then /health never answers healthy again while the CLI winds down, and names the dead process
    answers: list[tuple[int, dict[str, Any]]] = []
    deadline = time.monotonic() + STOP_S
    while cli.popen.poll() is None and time.monotonic() < deadline:
        answers.append(get_json(port, "/health"))
        time.sleep(PROBE_STEP_S)
    code = cli.wait(5)
    assert code != 0, cli.tail()
    assert [status for status, _ in answers if status == 200] == []
    reasons = [body["reason"] for status, body in answers if status == 503]
    assert any(f"worker process {victim} is dead" in reason for reason in reasons), answers
    assert port_closed(port)


@pytest.fixture
def doomed_database(database_server: DatabaseServer) -> Iterator[tuple[str, DatabaseServer, str]]:
    """A migrated database of its own, which the test drops while the CLI uses it."""
    name = f"doomed_{uuid.uuid4().hex[:12]}"
    url = database_server.clone_template(name)
    try:
        yield name, database_server, url
    finally:
        database_server.drop(name)


def test_a_database_outage_fails_readiness_but_not_liveness(
    doomed_database: tuple[str, DatabaseServer, str], run_dir: Path, workers: WorkerProcesses
) -> None:
    # Given the CLI, healthy and ready, on a database of its own
    name, server, url = doomed_database
    port = free_port()
    cli = workers.start(health_env(url, run_dir, port, heartbeat_stale_ms=OUTAGE_WINDOW_MS), processes=2)
    wait_until(lambda: healthy_workers(port, 2), BOOT_S, message="/health 200 with two workers")
    wait_until(lambda: get(port, "/ready")[0] == 200, 10, message="/ready 200")

    # When the database goes away
    with psycopg.connect(server.admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier(name)))

    # Then /ready answers 503, with a reason that gives nothing away
    def not_ready() -> dict[str, Any] | None:
        status, body = get_json(port, "/ready")
        return body if status == 503 else None

    body = wait_for(not_ready, 10, "/ready 503")
    # (gone at once, or, on a loaded machine, not answering within the readiness timeout)
    assert "unreachable" in body["reason"] or "did not answer within" in body["reason"]
    assert "postgresql://" not in json.dumps(body)
    # while /health stays 200 all along: restarting the worker would not bring the database back
    watched_until = time.monotonic() + OUTAGE_WATCH_S
    statuses = []
    while time.monotonic() < watched_until:
        statuses.append(get(port, "/health")[0])
        time.sleep(PROBE_STEP_S)
    assert set(statuses) == {200}, statuses
    assert get(port, "/ready")[0] == 503
    assert cli.popen.poll() is None
