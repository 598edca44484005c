"""The real `dramatiq tasks` CLI against a real database: jobs, processes, logs, start-up errors."""

from __future__ import annotations

import json
import signal
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.support.databases import DatabaseServer
from tests.support.processes import (
    Rows,
    WorkerProcesses,
    cli_env,
    insert_edge_jobs,
    iter_json,
    job_rows,
    status_counts,
    wait_until,
    with_credentials,
)

pytestmark = pytest.mark.slow

#: seconds for a CLI to boot and claim its first job
BOOT_S = 30.0
#: seconds for a CLI to exit after SIGTERM when no job is running
STOP_S = 15.0
#: seconds for a CLI that must refuse to start to give up
REFUSE_S = 20.0
#: Seconds the CLI may take to give up on a database that does not answer (two 10 s pool waits, then exit).
UNREACHABLE_S = 45.0
#: The ids every line written while a job runs must carry.
JOB_IDS = ("job_id", "session_id", "message_id", "worker_id", "correlation_id")
#: The test actors' module; under the CLI its actors record each run in public.test_runs.
TEST_ACTORS = "tests.support.actors"
#: A role with a password, so that the CLI's DATABASE_URL holds a real secret to look for in its output.
SECRET_ROLE = "qw_test"
SECRET_PASSWORD = "S3cretPw!"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerProcesses]:
    with WorkerProcesses(tmp_path) as started:
        yield started


def _completed(db: Rows, expected: int) -> bool:
    return status_counts(db).get("completed", 0) >= expected


def _job_lines(lines: list[str], message_prefix: str) -> list[dict[str, Any]]:
    return [
        parsed
        for _, parsed in iter_json(lines)
        if parsed is not None and str(parsed.get("message", "")).startswith(message_prefix)
    ]


def test_a_row_inserted_like_the_edge_function_is_completed(
    db: Rows, database_url: str, workers: WorkerProcesses
) -> None:
    # Given a row with only the columns the Edge Function fills
    [job_id] = insert_edge_jobs(db, 1, priority=10)
    env = cli_env(database_url, app_env="development", poll_interval_ms=200, coding_job_duration_ms=0)

    # When the real CLI runs
    cli = workers.start(env)
    wait_until(lambda: _completed(db, 1), BOOT_S, message="the row completed")

    # Then the default coding actor ran it, and the row says so
    row = job_rows(db)[job_id]
    assert row["status"] == "completed"
    assert row["completed_at"] is not None
    assert row["retry_count"] == 0
    assert row["error_message"] is None
    assert row["lease_expires_at"] is None  # the claim token stays: it makes a repeated ack harmless
    cli.wait_for_line(rf"Coding job finished.*job_id={job_id}", 5)
    code, _ = cli.stop(signal.SIGTERM, STOP_S)
    assert code == 0, cli.tail()


def test_every_job_runs_exactly_once_across_worker_processes(
    db: Rows, database_url: str, workers: WorkerProcesses
) -> None:
    # Given three worker processes of two threads each, with the test actors, all ready
    env = cli_env(database_url, poll_interval_ms=200, coding_job_duration_ms=20)
    cli = workers.start(env, TEST_ACTORS, processes=3, threads=2)
    cli.wait_for_lines(r"Worker process is ready for action", 3, BOOT_S)
    # (ready for action, and registered: a worker claims only once the queue knows it)
    registered = "select count(*) as n from public.queue_workers"
    wait_until(
        lambda: db.execute(registered).fetchone() == {"n": 3}, BOOT_S, message="three workers registered"
    )

    # When 200 jobs arrive at once: 100 coding jobs from the Edge Function, 100 from a producer
    coding_jobs = insert_edge_jobs(db, 100)
    keys = [f"job-{n}" for n in range(100)]
    messages = [{"actor_name": "record", "args": [key]} for key in keys]
    db.execute("select public.enqueue_jobs(%s::jsonb)", (json.dumps(messages),))
    wait_until(lambda: _completed(db, 200), 60, message="all 200 rows completed")
    code, _ = cli.stop(signal.SIGTERM, STOP_S)
    assert code == 0, cli.tail()

    # Then every row is completed, first time
    rows = job_rows(db)
    assert len(rows) == 200
    assert {row["status"] for row in rows.values()} == {"completed"}
    assert {row["retry_count"] for row in rows.values()} == {0}
    # and each coding job started exactly once (one log line per run)
    starts = _job_lines(cli.lines, "Coding job started")
    coding_runs = Counter(str(line["job_id"]) for line in starts)
    assert set(coding_runs) == set(coding_jobs)
    assert [job for job, count in coding_runs.items() if count != 1] == []
    # and each producer job ran exactly once (one row per run in test_runs, written by the actor)
    recorded = db.execute(
        "select run_key, count(*) as runs from public.test_runs where actor_name = 'record' group by 1"
    ).fetchall()
    record_runs = {str(row["run_key"]): int(row["runs"]) for row in recorded}
    assert set(record_runs) == set(keys)
    assert [key for key, count in record_runs.items() if count != 1] == []
    # and all three processes took a share
    assert len({row["locked_by"] for row in rows.values()}) == 3


def _ensure_secret_role(server: DatabaseServer) -> None:
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_roles where rolname = %s", (SECRET_ROLE,)).fetchone()
        if exists is None:
            conn.execute(
                sql.SQL("create role {} login superuser password {}").format(
                    sql.Identifier(SECRET_ROLE), sql.Literal(SECRET_PASSWORD)
                )
            )


def test_production_logs_are_json_carry_the_job_ids_and_no_secrets(
    db: Rows, database_url: str, database_server: DatabaseServer, workers: WorkerProcesses
) -> None:
    # Given a DATABASE_URL with a real password, a service key, and debug logging in production
    _ensure_secret_role(database_server)
    secret_url = with_credentials(database_url, SECRET_ROLE, SECRET_PASSWORD)
    service_key = f"fake-service-role-{uuid.uuid4().hex}"
    env = cli_env(
        secret_url,
        app_env="production",
        log_level="debug",
        poll_interval_ms=200,
        coding_job_duration_ms=300,
        supabase_service_role_key=service_key,
    )
    # and a producer's job with its own correlation id, beside an Edge Function row without one
    correlation_id = f"corr-{uuid.uuid4().hex}"
    session_id = str(uuid.uuid4())
    db.execute(
        "select public.enqueue_jobs(%s::jsonb)",
        (
            json.dumps(
                [
                    {
                        "actor_name": "run_coding_job",
                        "kwargs": {"prompt": "with a correlation id", "session_id": session_id},
                        "options": {"correlation_id": correlation_id},
                    }
                ]
            ),
        ),
    )
    [edge_job] = insert_edge_jobs(db, 1)
    producer_job = next(job for job in job_rows(db) if job != edge_job)

    # When the container's command runs both and stops
    cli = workers.launch({**env, "MAX_CONCURRENT_JOBS": "2"})
    wait_until(lambda: _completed(db, 2), BOOT_S, message="both rows completed")
    code, _ = cli.stop(signal.SIGTERM, STOP_S)
    assert code == 0, cli.tail()
    lines = cli.lines

    # Then every line, the dramatiq main process's own included, is one JSON object with the standard keys
    records = all_json(lines)
    assert all({"ts", "level", "logger", "message"} <= record.keys() for record in records)
    main_lines = {record["message"] for record in records if record["logger"] == "dramatiq.MainProcess"}
    assert "Sending signal 'SIGTERM' to subprocesses..." in main_lines, main_lines

    # and every line written while a job ran carries the job's ids
    rows = job_rows(db)
    for job_id in (producer_job, edge_job):
        job_records = [record for record in records if record.get("job_id") == job_id]
        assert any(record["logger"].startswith("jobs.coding") for record in job_records), job_id
        for record in job_records:
            missing = [key for key in JOB_IDS if not record.get(key)]
            assert missing == [], f"{missing} missing from {record}"
            assert record["session_id"] == rows[job_id]["session_id"]
        # one correlation id per job: the producer's own when it set one, a fresh one otherwise
        correlation_ids = {record["correlation_id"] for record in job_records}
        if job_id == producer_job:
            assert correlation_ids == {correlation_id}
        else:
            assert len(correlation_ids) == 1 and correlation_id not in correlation_ids
    coding_lines = [record for record in records if record["logger"].startswith("jobs.coding")]
    assert coding_lines and all(record.get("job_id") in (producer_job, edge_job) for record in coding_lines)

    # and neither the database password nor the service key appears anywhere
    output = cli.output
    assert SECRET_PASSWORD not in output
    assert "S3cretPw" not in output  # URL-encoded too
    assert service_key not in output


def test_settings_errors_are_all_listed_without_a_traceback(workers: WorkerProcesses) -> None:
    # Given production settings with no DATABASE_URL and a poll interval that is not a number
    env = cli_env(None, app_env="production", poll_interval_ms="abc")

    # When the stock CLI starts, and the container's command
    for cli in (workers.start(env), workers.launch(env)):
        code = cli.wait(REFUSE_S)

        # Then each exits with the configuration exit code, naming both problems, and no traceback
        output = cli.output
        assert code == 2, output
        assert "DATABASE_URL" in output, output
        assert "POLL_INTERVAL_MS" in output, output
        assert "Traceback" not in output, output
        assert "Worker process is ready" not in output

    # and the container's command says it in one JSON line (production), every problem listed
    [line] = all_json(cli.lines)
    assert line["level"] == "CRITICAL"
    assert [problem.split(":")[0] for problem in line["problems"]] == ["POLL_INTERVAL_MS", "DATABASE_URL"]


def test_missing_migrations_are_reported_without_a_traceback(
    database_server: DatabaseServer, workers: WorkerProcesses
) -> None:
    # Given a database where the migrations were never applied
    name = f"test_empty_{uuid.uuid4().hex[:12]}"
    empty_url = database_server.create_database(name)
    try:
        env = cli_env(empty_url, app_env="production", poll_interval_ms=200)

        # When the container's command starts
        cli = workers.launch(env)
        code = cli.wait(REFUSE_S)
    finally:
        workers.close()
        database_server.drop(name)

    # Then it exits with the configuration exit code and says what to do, on plain PostgreSQL too
    output = cli.output
    assert code == 2, output
    assert "apply the migrations" in output.lower(), output
    assert "python -m service.migrate --bootstrap" in output, output
    assert "Traceback" not in output, output
    assert "Worker process is ready" not in output
    # and, in production, every line says it as JSON, the dramatiq main process's last words included
    records = all_json(cli.lines)
    assert any(record["level"] == "CRITICAL" and "migrations" in record["message"] for record in records)
    assert any(
        record["logger"] == "dramatiq.MainProcess" and "code 2" in record["message"] for record in records
    )


def test_an_unreachable_database_is_reported_without_a_traceback(workers: WorkerProcesses) -> None:
    # Given a DATABASE_URL (with a password) that nothing answers on
    password = "Unreachable-S3cret"
    env = cli_env(f"postgresql://worker:{password}@127.0.0.1:1/queue", app_env="production")

    # When the CLI starts
    cli = workers.start(env)
    code = cli.wait(UNREACHABLE_S)

    # Then it exits with Dramatiq's connection-failure code and says so, with no secret and no traceback
    output = cli.output
    assert code == 3, output
    assert "Cannot reach the queue" in output, output
    assert "Traceback" not in output and password not in output, output


def test_a_refused_login_is_a_configuration_error_not_a_restart(workers: WorkerProcesses) -> None:
    # Given a DATABASE_URL whose user the server does not know (as a wrong password would be refused)
    password = "Refused-S3cret"
    env = cli_env(f"postgresql://no_such_worker:{password}@127.0.0.1:5432/postgres", app_env="production")

    # When the container's command starts
    cli = workers.launch(env)
    code = cli.wait(REFUSE_S)

    # Then it exits with the configuration exit code, not the "cannot connect" one that a restart retries
    output = cli.output
    assert code == 2, output
    critical = [record for record in all_json(cli.lines) if record["level"] == "CRITICAL"]
    assert critical and "refused" in critical[0]["message"], output
    assert "no_such_worker" in critical[0]["message"]
    assert "Traceback" not in output and password not in output, output


def test_a_taken_health_port_stops_the_worker_before_it_claims(
    db: Rows, database_url: str, workers: WorkerProcesses
) -> None:
    # Given a job waiting, and another process listening on the health check port
    [job_id] = insert_edge_jobs(db, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = cli_env(database_url, app_env="production", health_check_port=port, poll_interval_ms=200)

        # When the CLI starts
        cli = workers.start(env)
        code = cli.wait(REFUSE_S)

    # Then it refuses to run without its probe endpoint: a configuration error, said once, nothing claimed
    output = cli.output
    assert code == 2, output
    assert any(
        record["level"] == "CRITICAL" and f"HEALTH_CHECK_PORT {port}" in record["message"]
        for _, record in iter_json(cli.lines)
        if record is not None
    ), output
    assert "Worker process is ready" not in output
    assert job_rows(db)[job_id]["status"] == "pending"


def all_json(lines: list[str]) -> list[dict[str, Any]]:
    """Every line as a JSON object; fails the test naming the lines that are not."""
    not_json = [line for line, parsed in iter_json(lines) if parsed is None]
    assert not_json == [], "lines that are not JSON objects:\n" + "\n".join(not_json[:20])
    return [parsed for _, parsed in iter_json(lines) if parsed is not None]
