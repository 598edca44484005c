"""The queue's transport from the settings, and which queue that is in words: used by the worker's wiring, the
health server and producers alike. Building a transport opens no connection; the first call does.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

from broker.transport import Transport
from service.budget import DASHBOARD_POOL_SIZE, HEALTH_POOL_SIZE, worker_pool_size
from service.embedded_db import find_embedded_postgres
from service.errors import ConfigurationError
from service.settings import Settings, TransportKind

#: How the health server's connection shows in pg_stat_activity (the workers' show as queue-worker).
HEALTH_APPLICATION_NAME = "queue-health"
#: application_name of the dashboard's connections.
DASHBOARD_APPLICATION_NAME = "queue-dashboard"


def database_url(settings: Settings) -> str:
    """DATABASE_URL, or in development the URL of the embedded PostgreSQL already running; it starts nothing.

    Raises ConfigurationError when neither is there: a process that silently started its own database (in
    whatever folder it happened to run) would send its jobs where no worker looks.
    """
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    data_dir = Path(settings.embedded_database_dir).resolve()
    embedded = find_embedded_postgres(data_dir)
    if embedded is None:
        raise ConfigurationError(
            [
                f"DATABASE_URL: not set (looked in the environment and in {Path('.env').resolve()}), and no "
                f"embedded development database runs in {data_dir}. Set DATABASE_URL, or start the "
                "embedded one from the repository folder: `python -m service.migrate` (or `python3 "
                "scripts/dev.py run`)"
            ]
        )
    return embedded.url


def build_transport(settings: Settings) -> Transport:
    """The transport the settings select, sized for a worker process (service/budget.py)."""
    if settings.transport is TransportKind.rest:
        from broker.rest import SPARE_CONNECTIONS, RestTransport

        # The settings' cross-field rules guarantee both for the REST transport.
        assert settings.supabase_url is not None and settings.supabase_service_role_key is not None
        return RestTransport(
            str(settings.supabase_url),
            settings.supabase_service_role_key.get_secret_value(),
            max_connections=settings.max_concurrent_jobs + SPARE_CONNECTIONS,
        )
    from broker.postgres import PostgresTransport

    return PostgresTransport(
        database_url(settings),
        pool_size=settings.database_pool_size or worker_pool_size(settings.max_concurrent_jobs),
        poll_only=settings.database_poll_only,
    )


def build_health_transport(settings: Settings) -> Transport:
    """The transport of the health server: one connection, no LISTEN, no session probe."""
    return _reader_transport(settings, HEALTH_POOL_SIZE, HEALTH_APPLICATION_NAME)


def build_dashboard_transport(settings: Settings) -> Transport:
    """The transport of the dashboard: its own small pool, named as the dashboard's, no LISTEN."""
    return _reader_transport(settings, DASHBOARD_POOL_SIZE, DASHBOARD_APPLICATION_NAME)


def _reader_transport(settings: Settings, pool_size: int, application_name: str) -> Transport:
    """A transport for a process that reads and acts through the queue's functions but runs no jobs."""
    if settings.transport is TransportKind.rest:
        return build_transport(settings)
    from broker.postgres import PostgresTransport

    return PostgresTransport(
        database_url(settings), pool_size=pool_size, application_name=application_name, sessions=False
    )


def describe_queue(settings: Settings) -> str:
    """Which queue the settings point at, for a log line: never a password or a key."""
    if settings.transport is TransportKind.rest:
        return f"the Supabase project {settings.supabase_url} over REST"
    if settings.database_url is not None:
        return f"{describe_target(settings.database_url.get_secret_value())} (DATABASE_URL)"
    data_dir = Path(settings.embedded_database_dir).resolve()
    return f"the embedded development database in {data_dir} (no DATABASE_URL is set)"


def describe_target(url: str) -> str:
    """Where a URL points, for logs: database, host and port, never the password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "the configured database"
    host = info.get("host") or "the default socket"
    port = info.get("port") or "5432"
    return f"database {info.get('dbname') or info.get('user') or '?'} on {host}:{port}"
