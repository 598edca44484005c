"""Producers: Python code that imports `tasks` to send jobs, run as real processes outside the repository.

Importing `tasks` must behave like importing a library: no connection, no exit, no database started; a
producer learns of problems through exceptions, and is told which queue it sends to.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psycopg

from service.embedded_db import stop_embedded_postgres
from tests.support.databases import DatabaseServer
from tests.support.processes import REPO_ROOT

#: Seconds a producer script may take: an interpreter start, imports and a call or two.
SCRIPT_TIMEOUT_S = 60


def run_producer(script: str, cwd: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    """Run `script` with the project's interpreter in `cwd`, with only PATH, HOME and `environment` set."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        # The project's code, whatever the working directory, as an installed package would be found.
        "PYTHONPATH": str(REPO_ROOT),
        **environment,
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )


def test_importing_tasks_neither_connects_nor_exits(database_server: DatabaseServer, tmp_path: Path) -> None:
    # Given a DATABASE_URL that nothing answers on
    unreachable = run_producer(
        """
        import tasks
        print("imported", type(tasks.broker).__name__)
        """,
        tmp_path,
        APP_ENV="production",
        DATABASE_URL="postgresql://worker:pw@127.0.0.1:1/queue",
    )

    # Then `import tasks` returns: it opened no connection, so nothing failed and nothing exited
    assert unreachable.returncode == 0, unreachable.stderr
    assert unreachable.stdout.strip() == "imported SupabaseBroker"

    # Given a database the migrations were never applied to
    name = f"test_empty_{uuid.uuid4().hex[:12]}"
    empty_url = database_server.create_database(name)
    try:
        # When a producer sends a job
        empty = run_producer(
            """
            import tasks
            try:
                tasks.run_coding_job.send(prompt="add a dark mode")
            except Exception as exc:
                print("raised", type(exc).__name__)
            """,
            tmp_path,
            APP_ENV="production",
            DATABASE_URL=empty_url,
        )
    finally:
        database_server.drop(name)

    # Then it gets an exception it can handle; the process was never ended under it
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.strip() == "raised QueueSchemaMissing", empty.stderr


def test_a_producer_says_which_database_it_sends_to(database_url: str, tmp_path: Path) -> None:
    # When a producer sends a job through a DATABASE_URL
    result = run_producer(
        """
        from tasks import run_coding_job
        run_coding_job.send(prompt="add a dark mode")
        """,
        tmp_path,
        APP_ENV="production",
        DATABASE_URL=database_url,
    )

    # Then it said which database, and the job is there
    assert result.returncode == 0, result.stderr
    database = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    assert f"database {database} on 127.0.0.1:5432" in result.stderr, result.stderr
    with psycopg.connect(database_url) as conn:
        row = conn.execute("select count(*) from public.coding_jobs").fetchone()
    assert row == (1,)


def test_a_producer_outside_the_repository_starts_no_database_and_says_why(tmp_path: Path) -> None:
    # Given a folder with no .env (so development settings) and no embedded database running in it
    data_dir = tmp_path / ".data" / "postgres"
    try:
        # When a producer imports tasks there
        result = run_producer(
            """
            try:
                import tasks
            except Exception as exc:
                print(type(exc).__name__)
                print(exc)
            """,
            tmp_path,
        )
    finally:
        stop_embedded_postgres(data_dir)  # in case one was started after all

    # Then it is told that no database is configured, where it looked, and what to do
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ConfigurationError\n"), result.stdout + result.stderr
    assert "DATABASE_URL: not set" in result.stdout
    assert str(data_dir) in result.stdout
    assert str(tmp_path / ".env") in result.stdout
    # and nothing was started or created in that folder
    assert not (tmp_path / ".data").exists()


def test_producers_get_the_broker_from_tasks_and_the_wrong_way_fails_loudly(
    database_url: str, tmp_path: Path
) -> None:
    # The documented way: the broker comes from `tasks`, before any actor is declared
    documented = run_producer(
        """
        import dramatiq
        from tasks import broker

        @dramatiq.actor(broker=broker)
        def resize_image(image_id: str) -> None: ...

        resize_image.send("img-1")
        """,
        tmp_path,
        APP_ENV="production",
        DATABASE_URL=database_url,
    )
    assert documented.returncode == 0, documented.stderr
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("select actor_name, args from public.coding_jobs").fetchall()
    assert rows == [("resize_image", ["img-1"])]

    # The wrong way: an actor declared before `tasks` was imported landed on Dramatiq's default broker
    wrong = run_producer(
        """
        import dramatiq

        @dramatiq.actor
        def resize_image(image_id: str) -> None: ...

        import tasks
        """,
        tmp_path,
        APP_ENV="production",
        DATABASE_URL=database_url,
    )

    # Then importing tasks refuses, saying what happened and what to do
    assert wrong.returncode != 0
    assert "BrokerConflict" in wrong.stderr, wrong.stderr
    assert re.search(r"RabbitmqBroker|RedisBroker", wrong.stderr), wrong.stderr
    assert "Import tasks before declaring actors" in wrong.stderr
