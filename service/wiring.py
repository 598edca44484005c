"""Builds the worker's broker from the settings: the one place that wires the broker to its transport.

Nothing connects here: the transport's pool opens on first use, and the worker process checks the queue at
start-up (`worker.startup`), so a producer that imports `tasks` never blocks or exits at import.
"""

from __future__ import annotations

from dramatiq.middleware import GroupCallbacks
from dramatiq.results import Results

from broker.broker import SupabaseBroker
from broker.retention import retention_ms
from service.settings import Settings
from service.transports import build_transport


def build_broker(settings: Settings) -> SupabaseBroker:
    """The broker over the transport the settings select, with the result backends it supports."""
    broker = SupabaseBroker(
        build_transport(settings),
        lease_ms=settings.job_lease_ms,
        poll_interval_ms=settings.poll_interval_ms,
        claim_ahead=settings.claim_ahead_jobs,
        concurrency=settings.max_concurrent_jobs,
        shutdown_timeout_ms=settings.shutdown_timeout_ms,
        max_rescues=settings.max_rescues,
        unknown_actor_grace_ms=settings.unknown_actor_grace_ms,
        retain_completed_ms=retention_ms(settings.completed_retention_days),
        retain_failed_ms=retention_ms(settings.failed_retention_days),
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
