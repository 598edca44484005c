"""Builds the transport and the broker from the settings: the one place that wires them."""

from __future__ import annotations

from dramatiq.middleware import GroupCallbacks
from dramatiq.results import Results

from broker.broker import SupabaseBroker
from broker.transport import Transport
from service.settings import Settings, TransportKind

#: Connections beyond one per worker thread: the consumer, the lease keeper, producers inside jobs.
EXTRA_POOL_CONNECTIONS = 3


def database_url(settings: Settings) -> str:
    """DATABASE_URL, or the embedded PostgreSQL's URL in development (started and migrated on first use)."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    from service.embedded_db import ensure_embedded_database

    return ensure_embedded_database(settings)


def build_transport(settings: Settings) -> Transport:
    """The transport the settings select."""
    if settings.transport is TransportKind.rest:
        from broker.rest import RestTransport

        return RestTransport.from_settings(settings)
    from broker.postgres import PostgresTransport

    return PostgresTransport(
        database_url(settings),
        pool_size=settings.max_concurrent_jobs + EXTRA_POOL_CONNECTIONS,
        poll_only=settings.database_poll_only,
    )


def build_broker(settings: Settings) -> SupabaseBroker:
    """The broker over the selected transport, with the queue's schema checked."""
    transport = build_transport(settings)
    try:
        transport.check_schema()
    except BaseException:
        transport.close()  # a refused start-up leaves no connection behind
        raise
    broker = SupabaseBroker(
        transport,
        lease_ms=settings.job_lease_ms,
        poll_interval_ms=settings.poll_interval_ms,
        claim_ahead=settings.claim_ahead_jobs,
        concurrency=settings.max_concurrent_jobs,
        shutdown_timeout_ms=settings.shutdown_timeout_ms,
        max_rescues=settings.max_rescues,
        unknown_actor_grace_ms=settings.unknown_actor_grace_ms,
    )
    add_result_backends(broker)
    return broker


def add_result_backends(broker: SupabaseBroker) -> None:
    """Results and group callbacks in the queue's database, on the transport's pool (direct only)."""
    from broker.postgres import PostgresTransport

    if not isinstance(broker.transport, PostgresTransport):
        return
    from broker.results import PostgresRateLimiterBackend, PostgresResultBackend

    pool = broker.transport.calls.pool
    broker.add_middleware(Results(backend=PostgresResultBackend(pool=pool)))
    broker.add_middleware(GroupCallbacks(PostgresRateLimiterBackend(pool=pool)))
