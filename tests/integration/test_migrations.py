"""The migrations command: fresh databases, re-runs, concurrent appliers, failures, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from service.migrate import SUPABASE_DIR, MigrationError, apply_migrations
from tests.support.databases import DatabaseServer

REPO_ROOT = Path(__file__).resolve().parents[2]
#: seconds a `python -m service.migrate` subprocess may take
CLI_TIMEOUT_S = 60
#: seconds the concurrent appliers may take
THREAD_TIMEOUT_S = 60


def migration_versions() -> list[str]:
    """The versions of the files in supabase/migrations, read here independently of service.migrate."""
    return sorted(path.name.split("_", 1)[0] for path in (SUPABASE_DIR / "migrations").glob("*.sql"))


def schema_snapshot(url: str) -> dict[str, list[tuple[object, ...]]]:
    """What a migration can change: columns, functions, indexes, policies, triggers, grants and roles."""
    queries = {
        "columns": """
            select table_schema, table_name, column_name, data_type, column_default, is_nullable
              from information_schema.columns
             where table_schema in ('public', 'auth', 'supabase_migrations')
             order by 1, 2, 3""",
        "functions": """
            select p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid)), coalesce(p.proacl::text, '')
              from pg_proc p
             where p.pronamespace in ('public'::regnamespace, 'auth'::regnamespace)
             order by 1""",
        "indexes": "select indexname, indexdef from pg_indexes where schemaname = 'public' order by 1",
        "policies": "select policyname, cmd, roles::text, qual from pg_policies order by 1",
        "triggers": "select tgname, tgenabled from pg_trigger where not tgisinternal order by 1",
        "tables": """
            select c.oid::regclass::text, c.relrowsecurity, coalesce(c.relacl::text, '')
              from pg_class c where c.relnamespace = 'public'::regnamespace order by 1""",
        "enum": "select enum_range(null::public.job_status)::text",
        "history": "select version, name from supabase_migrations.schema_migrations order by 1",
    }
    with psycopg.connect(url) as conn:
        return {name: conn.execute(query).fetchall() for name, query in queries.items()}


@pytest.fixture
def empty_database(database_server: DatabaseServer) -> Iterator[str]:
    """A URL to a new, empty database: no queue schema, no migration history."""
    name = f"migrate_{uuid.uuid4().hex[:12]}"
    url = database_server.create_database(name)
    try:
        yield url
    finally:
        database_server.drop(name)


def test_migrations_apply_to_an_empty_database(empty_database: str) -> None:
    applied = apply_migrations(empty_database, bootstrap=True)

    assert applied == migration_versions()
    assert applied, "there must be at least one migration to apply"
    with psycopg.connect(empty_database) as conn:
        recorded = conn.execute(
            "select version, name, statements from supabase_migrations.schema_migrations order by version"
        ).fetchall()
        assert conn.execute("select to_regclass('public.coding_jobs')::text").fetchone() == ("coding_jobs",)
    assert [version for version, _, _ in recorded] == migration_versions()
    for version, name, statements in recorded:
        # The Supabase CLI's history: the file's name after the version, and the SQL it ran.
        (path,) = (SUPABASE_DIR / "migrations").glob(f"{version}_*.sql")
        assert name == path.stem.split("_", 1)[1]
        assert statements == [path.read_text(encoding="utf-8")]


def test_a_second_run_applies_nothing_and_changes_nothing(empty_database: str) -> None:
    # Given a migrated database
    apply_migrations(empty_database, bootstrap=True)
    before = schema_snapshot(empty_database)

    # When the migrations run again, bootstrap included
    applied = apply_migrations(empty_database, bootstrap=True)

    # Then nothing is applied and the schema is as it was
    assert applied == []
    assert schema_snapshot(empty_database) == before
    assert before["history"], "the snapshot must see the migration history"


def test_concurrent_appliers_apply_each_migration_once(empty_database: str) -> None:
    # Given two appliers released at the same moment, as when several containers start together
    barrier = threading.Barrier(2, timeout=THREAD_TIMEOUT_S)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def apply() -> None:
        try:
            barrier.wait()
            results.append(apply_migrations(empty_database, bootstrap=True))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=apply) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(THREAD_TIMEOUT_S)

    # Then neither failed, and they took turns: each migration applied once, by one of them, in order
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    first, second = results
    assert sorted(first + second) == migration_versions()
    assert first == sorted(first) and second == sorted(second)
    with psycopg.connect(empty_database) as conn:
        history = conn.execute("select version from supabase_migrations.schema_migrations").fetchall()
        locks = conn.execute(
            "select count(*) from pg_locks where locktype = 'advisory'"
            " and database = (select oid from pg_database where datname = current_database())"
        ).fetchone()
    assert sorted(version for (version,) in history) == migration_versions()
    assert locks == (0,)


def test_a_failing_migration_leaves_the_previous_version(empty_database: str, tmp_path: Path) -> None:
    # Given a good migration followed by one that fails halfway through
    (tmp_path / "migrations").mkdir()
    (tmp_path / "bootstrap.sql").write_text("select 1;")
    (tmp_path / "migrations" / "001_good.sql").write_text("create table good (id int);")
    (tmp_path / "migrations" / "002_bad.sql").write_text(
        "create table half (id int);\nselect * from missing;"
    )

    # When they are applied
    with pytest.raises(MigrationError) as caught:
        apply_migrations(empty_database, bootstrap=True, supabase_dir=tmp_path)

    # Then the error names the file, the good one is recorded, and nothing of the bad one remains
    assert caught.value.version == "002"
    assert "002_bad.sql" in str(caught.value)
    assert "missing" in str(caught.value)
    with psycopg.connect(empty_database) as conn:
        history = conn.execute("select version from supabase_migrations.schema_migrations").fetchall()
        tables = conn.execute("select to_regclass('good')::text, to_regclass('half')::text").fetchone()
    assert history == [("001",)]
    assert tables == ("good", None)


def run_migrate_cli(
    database_url: str, *args: str, app_env: str = "development"
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, "APP_ENV": app_env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    for name in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "QUEUE_TRANSPORT"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "service.migrate", *args],
        env=env,
        # Away from the repository so a developer's .env cannot change the outcome.
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def test_cli_migrates_a_fresh_database(empty_database: str) -> None:
    first = run_migrate_cli(empty_database, "--bootstrap")
    second = run_migrate_cli(empty_database, "--bootstrap")

    assert first.returncode == 0, first.stderr
    assert all(version in first.stderr for version in migration_versions())
    assert second.returncode == 0, second.stderr
    assert "Nothing to apply" in second.stderr
    with psycopg.connect(empty_database) as conn:
        recorded = conn.execute(
            "select version from supabase_migrations.schema_migrations order by 1"
        ).fetchall()
    assert [version for (version,) in recorded] == migration_versions()


def test_cli_rejects_an_invalid_database_url_with_exit_2() -> None:
    result = run_migrate_cli("mysql://worker:hunter2@db.example/queue")

    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr
    assert "postgresql://" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "hunter2" not in result.stderr + result.stdout


def test_cli_reports_an_unreachable_database_without_its_password() -> None:
    result = run_migrate_cli("postgresql://worker:hunter2@127.0.0.1:1/queue?connect_timeout=5")

    assert result.returncode == 1
    assert "Could not apply migrations to database queue on 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "hunter2" not in result.stderr + result.stdout


def test_cli_on_plain_postgresql_says_to_bootstrap_first(empty_database: str) -> None:
    # Given plain PostgreSQL: no auth schema in the database
    result = run_migrate_cli(empty_database)

    # Then it refuses before applying anything, in one line that says what to run instead
    assert result.returncode == 2, result.stderr
    assert "plain PostgreSQL" in result.stderr
    assert "python -m service.migrate --bootstrap" in result.stderr
    assert "Traceback" not in result.stderr
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("select to_regclass('public.coding_jobs')").fetchone() == (None,)


def test_cli_lines_are_json_in_production(empty_database: str) -> None:
    result = run_migrate_cli(empty_database, "--bootstrap", app_env="production")

    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert any("Applied" in line["message"] for line in lines)
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)


def test_bootstrap_leaves_a_supabase_project_alone(empty_database: str) -> None:
    # Given a database with Supabase's own auth schema (auth.users) and its own auth.uid()
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(SUPABASE_AUTH_STAND_IN)
        before = conn.execute("select md5(pg_get_functiondef('auth.uid()'::regprocedure))").fetchone()

    # When the migrations are applied with --bootstrap, as `dev.py run` and compose do
    result = run_migrate_cli(empty_database, "--bootstrap")

    # Then the queue is migrated, Supabase's auth.uid() is untouched, and the output says why
    assert result.returncode == 0, result.stderr
    assert "Supabase project" in result.stderr
    with psycopg.connect(empty_database) as conn:
        after = conn.execute("select md5(pg_get_functiondef('auth.uid()'::regprocedure))").fetchone()
        assert conn.execute("select to_regclass('public.coding_jobs')::text").fetchone() == ("coding_jobs",)
    assert after == before


#: What the migrations need of a Supabase project's auth schema, written as Supabase writes it.
SUPABASE_AUTH_STAND_IN = """
create schema auth;
create table auth.users (id uuid primary key);
create function auth.uid() returns uuid language sql stable as $$
  select nullif(current_setting('request.jwt.claim.sub', true), '')::uuid
$$;
grant usage on schema auth to anon, authenticated, service_role;
"""


# -- issue 10, item 10: nothing outside our own objects ----------------------------------------------------
UNSET_ROLE_TIMEOUT = SUPABASE_DIR / "migrations" / "20261202000200_unset_service_role_timeout.sql"


def service_role_statement_timeout(conn: psycopg.Connection[tuple[object, ...]]) -> str | None:
    """service_role's cluster-wide statement_timeout setting, as this transaction sees it."""
    row = conn.execute(
        "select (select c from unnest(s.setconfig) c where c like 'statement_timeout=%%')"
        "  from pg_db_role_setting s join pg_roles r on r.oid = s.setrole"
        " where r.rolname = 'service_role' and s.setdatabase = 0"
    ).fetchone()
    return None if row is None or row[0] is None else str(row[0]).split("=", 1)[1]


@pytest.mark.parametrize(
    ("before", "after"),
    [("8s", None), ("5s", "5s"), (None, None)],
    ids=["ours-is-undone", "an-operators-stays", "none-is-not-set"],
)
def test_the_role_statement_timeout_we_set_is_undone_and_no_other(
    database_url: str, before: str | None, after: str | None
) -> None:
    # Role settings are cluster-wide: each case runs in a transaction that is rolled back, so no other session
    # (nor another test run on the same server) ever sees it.
    with psycopg.connect(database_url) as conn, conn.transaction(force_rollback=True):
        # Given service_role's statement timeout as an earlier migration or an operator left it
        conn.execute("alter role service_role reset statement_timeout")
        if before is not None:
            setting = sql.SQL("alter role service_role set statement_timeout = {}")
            conn.execute(setting.format(sql.Literal(before)))

        # When the migration runs (twice: re-running it is harmless)
        conn.execute(UNSET_ROLE_TIMEOUT.read_text(encoding="utf-8"))
        conn.execute(UNSET_ROLE_TIMEOUT.read_text(encoding="utf-8"))

        # Then only the value an earlier migration of ours set is gone
        assert service_role_statement_timeout(conn) == after
