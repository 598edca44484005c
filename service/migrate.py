"""Apply the queue's SQL: the plain-PostgreSQL bootstrap, then each migration not yet recorded.

Applied versions go in `supabase_migrations.schema_migrations`, the table the Supabase CLI keeps, so
`supabase db push` and `python -m service.migrate` agree on what a database already has.

Usage: `python -m service.migrate [--bootstrap]` applies to the settings' DATABASE_URL (or, in
development without one, to the embedded PostgreSQL). `--bootstrap` also creates Supabase's roles and
`auth.uid()`: use it on plain PostgreSQL only, never on a Supabase project.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
from loguru import logger

from service.errors import ConfigurationError, ServiceError


def _find_supabase_dir() -> Path:
    """The repository's supabase/ folder; an installed wheel carries the same files as service/sql/."""
    repository = Path(__file__).resolve().parent.parent / "supabase"
    if (repository / "migrations").is_dir() and (repository / "bootstrap.sql").is_file():
        return repository
    return Path(__file__).resolve().parent / "sql"


SUPABASE_DIR = _find_supabase_dir()

#: Any fixed bigint works; every applier of this schema must use the same one.
MIGRATION_LOCK_ID = 0x51_75_65_75_65_4D_69_67

# The Supabase CLI's own names: `<digits>_<name>.sql`; it skips other files, and so do we.
_MIGRATION_FILE = re.compile(r"^(?P<version>[0-9]+)_(?P<name>.*)\.sql$")

# The Supabase CLI creates the history table the same way, so either tool may run first.
_HISTORY_TABLE_SQL = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (version text not null primary key);
alter table supabase_migrations.schema_migrations add column if not exists statements text[];
alter table supabase_migrations.schema_migrations add column if not exists name text;
"""


_DESCRIPTION = "Apply the queue's bootstrap and migrations to DATABASE_URL."


class MigrationError(ServiceError):
    """Raised when a migration file fails to apply; `version` and `path` name it, `cause` says why."""

    def __init__(self, version: str, path: Path, cause: str) -> None:
        self.version = version
        self.path = path
        self.cause = cause
        super().__init__(f"migration {path.name} failed: {cause}")


@dataclass(frozen=True)
class Migration:
    """One file of `supabase/migrations`."""

    version: str
    name: str
    path: Path

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def find_migrations(migrations_dir: Path) -> list[Migration]:
    """The migration files in the order they apply: by version, as the Supabase CLI orders them."""
    migrations: list[Migration] = []
    for path in sorted(migrations_dir.glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if match is None:
            logger.warning("Skipping {}: migration files are named <version>_<name>.sql", path.name)
            continue
        migrations.append(Migration(match["version"], match["name"], path))
    return migrations


def apply_migrations(url: str, *, bootstrap: bool, supabase_dir: Path = SUPABASE_DIR) -> list[str]:
    """Apply the bootstrap (when asked) and every unrecorded migration; return the versions applied.

    Each migration runs in its own transaction together with its history row, so a failure leaves the
    database at the previous version. A session advisory lock serialises appliers that start together.
    """
    applied: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        # Held until the connection closes: a failure anywhere below releases it too.
        conn.execute("select pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
        if bootstrap:
            bootstrap_path = supabase_dir / "bootstrap.sql"
            with conn.transaction():
                conn.execute(bootstrap_path.read_text(encoding="utf-8"))
            logger.debug("Applied {}", bootstrap_path.name)
        with conn.transaction():
            conn.execute(_HISTORY_TABLE_SQL)
        recorded = {
            version
            for (version,) in conn.execute("select version from supabase_migrations.schema_migrations")
        }
        for migration in find_migrations(supabase_dir / "migrations"):
            if migration.version in recorded:
                continue
            _apply_one(conn, migration)
            logger.info("Applied migration {} ({})", migration.version, migration.name)
            applied.append(migration.version)
    return applied


def _apply_one(conn: psycopg.Connection[tuple[object, ...]], migration: Migration) -> None:
    text = migration.sql()
    try:
        with conn.transaction():
            # No parameters: psycopg sends the file as one simple query, many statements and $$ bodies alike.
            conn.execute(text)
            conn.execute(
                "insert into supabase_migrations.schema_migrations (version, name, statements)"
                " values (%s, %s, %s)",
                (migration.version, migration.name, [text]),
            )
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        raise MigrationError(migration.version, migration.path, str(exc).strip()) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m service.migrate`: exit 0 when applied, 1 when the database refused, 2 on bad settings."""
    parser = argparse.ArgumentParser(prog="python -m service.migrate", description=_DESCRIPTION)
    parser.add_argument(
        "--bootstrap",
        action="store_true",
        help="also create Supabase's roles and auth.uid() (plain PostgreSQL only, never a Supabase project)",
    )
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, format="{time:HH:mm:ss} {level} {message}", level="INFO")

    from service.settings import load_settings
    from service.transports import describe_target

    try:
        settings = load_settings()
        if settings.uses_embedded_database:
            from service.embedded_db import start_embedded_postgres

            embedded = start_embedded_postgres(settings.embedded_database_dir)
            # The embedded database is plain PostgreSQL: it always gets the bootstrap.
            apply_migrations(embedded.url, bootstrap=True)
            logger.info("Embedded database in {} is up to date", settings.embedded_database_dir)
            return 0
        if settings.database_url is None:
            raise ConfigurationError(["DATABASE_URL: required to apply migrations"])
        url = settings.database_url.get_secret_value()
    except ConfigurationError as exc:
        print(exc.render(), file=sys.stderr)
        return 2

    target = describe_target(url)
    try:
        logger.info("Applying migrations to {}", target)
        applied = apply_migrations(url, bootstrap=args.bootstrap)
    except MigrationError as exc:
        logger.error("{}", exc)
        return 1
    except psycopg.Error as exc:
        # libpq's messages name the host and port, never the password.
        logger.error("Could not apply migrations to {}: {}", target, str(exc).strip())
        return 1
    if applied:
        logger.info("Applied {} migration(s): {}", len(applied), ", ".join(applied))
    else:
        logger.info("Nothing to apply: {} is up to date", target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
