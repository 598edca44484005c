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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from loguru import logger as _loguru

from service.errors import ConfigurationError, ServiceError
from service.exit_codes import EXIT_CONFIGURATION, EXIT_MIGRATION_FAILED

if TYPE_CHECKING:
    from loguru import Record


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


Connection = psycopg.Connection[tuple[object, ...]]

_DESCRIPTION = "Apply the queue's bootstrap and migrations to DATABASE_URL."


def _named(record: Record) -> None:
    record["name"] = "service.migrate"


#: Named after this module even when it runs as `python -m service.migrate` (whose __name__ is __main__).
logger = _loguru.patch(_named)


#: Whether the database is plain PostgreSQL or a Supabase project: Supabase's auth schema always has
#: auth.users (its auth server's table); our bootstrap creates the auth schema and roles, never that table.
_DATABASE_KIND_SQL = """
select to_regnamespace('auth') is not null
       and exists (select from pg_catalog.pg_roles where rolname = 'service_role') as has_supabase_roles,
       to_regclass('auth.users') is not null as is_supabase_project
"""


class BootstrapNeeded(ServiceError):
    """Raised when the database lacks Supabase's roles and auth schema and --bootstrap was not given."""

    def __init__(self) -> None:
        super().__init__(
            "the database has no Supabase roles or auth schema: it is plain PostgreSQL, not a Supabase "
            "project. Run `python -m service.migrate --bootstrap` to create them first (on a Supabase "
            "project --bootstrap changes nothing of Supabase's)."
        )


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

    The bootstrap is skipped on a Supabase project, whose roles and auth schema are Supabase's own; without
    it, plain PostgreSQL is refused with BootstrapNeeded before anything is applied. Each migration runs in
    its own transaction together with its history row, so a failure leaves the database at the previous
    version. Every transaction starts by taking a transaction-scoped advisory lock and only then reads the
    history, so appliers that start together take turns: each migration is applied once, in order, whoever
    applies it. The lock ends with its transaction, so nothing is left behind on the server connection, which
    a transaction-mode pooler (Supavisor port 6543) hands to its next client.
    """
    applied: list[str] = []
    migrations = find_migrations(supabase_dir / "migrations")
    # No server-side prepared statements: through a transaction pooler they would stay on its connections.
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        kind = conn.execute(_DATABASE_KIND_SQL).fetchone()
        has_supabase_roles, is_supabase_project = kind if kind is not None else (False, False)
        if bootstrap and is_supabase_project:
            logger.info("A Supabase project: its roles and auth schema are Supabase's own; no bootstrap")
        elif bootstrap:
            bootstrap_path = supabase_dir / "bootstrap.sql"
            with _turn(conn):
                conn.execute(bootstrap_path.read_text(encoding="utf-8"))
            logger.debug("Applied {}", bootstrap_path.name)
        elif not has_supabase_roles:
            raise BootstrapNeeded()
        with _turn(conn):
            conn.execute(_HISTORY_TABLE_SQL)
        while (migration := _apply_next(conn, migrations)) is not None:
            logger.info("Applied migration {} ({})", migration.version, migration.name)
            applied.append(migration.version)
    return applied


@contextmanager
def _turn(conn: Connection) -> Iterator[None]:
    """A transaction that holds the migration lock from its first statement to its end."""
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
        yield


def _apply_next(conn: Connection, migrations: list[Migration]) -> Migration | None:
    """Apply the first migration not yet recorded, in one turn with its history row; None when all are."""
    with _turn(conn):
        # Read under the lock: another applier may have applied some while we waited for our turn.
        recorded = {
            version
            for (version,) in conn.execute("select version from supabase_migrations.schema_migrations")
        }
        pending = [migration for migration in migrations if migration.version not in recorded]
        if not pending:
            return None
        migration = pending[0]
        text = migration.sql()
        try:
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
    return migration


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m service.migrate`: exit 0 when applied, 1 when the database refused, 2 on bad settings."""
    parser = argparse.ArgumentParser(prog="python -m service.migrate", description=_DESCRIPTION)
    parser.add_argument(
        "--bootstrap",
        action="store_true",
        help="first create Supabase's roles and auth.uid() where they are missing (plain PostgreSQL); "
        "a Supabase project is left as it is",
    )
    args = parser.parse_args(argv)

    from service.logs import configure_logging, report_configuration_error
    from service.settings import load_settings
    from service.transports import describe_target

    try:
        settings = load_settings()
        if settings.database_url is None and not settings.uses_embedded_database:
            raise ConfigurationError(["DATABASE_URL: required to apply migrations"])
    except ConfigurationError as exc:
        report_configuration_error(exc, logger_name=__name__)
        return EXIT_CONFIGURATION
    configure_logging(settings)

    if settings.database_url is None:
        return _migrate_embedded(settings.embedded_database_dir)
    url = settings.database_url.get_secret_value()
    target = describe_target(url)
    try:
        logger.info("Applying migrations to {}", target)
        applied = apply_migrations(url, bootstrap=args.bootstrap)
    except BootstrapNeeded as exc:
        logger.error("Not applying migrations to {}: {}", target, exc)
        return EXIT_CONFIGURATION
    except MigrationError as exc:
        logger.error("{}", exc)
        return EXIT_MIGRATION_FAILED
    except psycopg.Error as exc:
        # libpq's messages name the host and port, never the password.
        logger.error("Could not apply migrations to {}: {}", target, str(exc).strip())
        return EXIT_MIGRATION_FAILED
    if applied:
        logger.info("Applied {} migration(s): {}", len(applied), ", ".join(applied))
    else:
        logger.info("Nothing to apply: {} is up to date", target)
    return 0


def _migrate_embedded(data_dir: Path) -> int:
    """Development without DATABASE_URL: start the embedded PostgreSQL (an explicit command, so no surprise)
    and migrate it; it is plain PostgreSQL, so it always gets the bootstrap."""
    from service.embedded_db import (
        EmbeddedDatabaseUnavailable,
        find_embedded_postgres,
        start_embedded_postgres,
    )

    data_dir = data_dir.resolve()
    was_running = find_embedded_postgres(data_dir) is not None
    try:
        embedded = start_embedded_postgres(data_dir)
        applied = apply_migrations(embedded.url, bootstrap=True)
    except EmbeddedDatabaseUnavailable as exc:
        logger.error("No embedded PostgreSQL: {}", exc)
        return EXIT_CONFIGURATION
    except MigrationError as exc:
        logger.error("{}", exc)
        return EXIT_MIGRATION_FAILED
    logger.info(
        "The embedded development database in {} is {} and up to date ({} migration(s) applied); stop it with"
        " `python -m service.embedded_db stop`",
        data_dir,
        "running" if was_running else "started",
        len(applied),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
