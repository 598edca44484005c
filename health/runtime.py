"""Builds the health server's pieces from the settings: the one place they are wired together."""

from __future__ import annotations

import dataclasses

import falcon

from broker.transport import Transport
from health.app import create_app
from health.monitor import QueueMonitor
from health.readiness import ReadinessProbe
from health.stats_cache import StatsCache
from service.settings import Settings
from service.transports import build_health_transport


@dataclasses.dataclass(slots=True)
class HealthRuntime:
    """The app and what it holds open: the transport and the queue monitor's thread."""

    app: falcon.App[falcon.Request, falcon.Response]
    transport: Transport
    cache: StatsCache
    monitor: QueueMonitor

    def close(self) -> None:
        self.monitor.stop()
        self.transport.close()


def build_runtime(
    settings: Settings, transport: Transport | None = None, *, master_pid: int | None = None
) -> HealthRuntime:
    """The health app over the settings' transport (or the one given); the monitor is not started."""
    if transport is None:
        transport = build_health_transport(settings)
    cache = StatsCache(transport, settings.stats_cache_ms, wait_ms=settings.readiness_timeout_ms)
    app = create_app(
        run_dir=settings.run_path,
        heartbeat_stale_ms=settings.heartbeat_stale_ms,
        probe=ReadinessProbe(transport, settings.readiness_timeout_ms),
        cache=cache,
        master_pid=master_pid,
    )
    return HealthRuntime(
        app=app,
        transport=transport,
        cache=cache,
        monitor=QueueMonitor(cache, settings.queue_stats_interval_ms),
    )
