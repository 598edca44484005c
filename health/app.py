"""The Falcon health app: /health (liveness), /ready (readiness) and /metrics (Prometheus)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import falcon
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from health.liveness import assess, iso
from health.metrics import build_registry
from health.readiness import ReadinessProbe
from health.stats_cache import StatsCache

#: Probes must see the state now, never a cached response from a proxy.
NO_STORE = "no-store"


class HealthResource:
    """Liveness: fails only for what a restart repairs (a dead or frozen worker), never the database."""

    def __init__(self, run_dir: Path, window_s: float, master_pid: int | None) -> None:
        self.run_dir = run_dir
        self.window_s = window_s
        self.master_pid = master_pid
        self._started = time.monotonic()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        now = time.time()
        liveness = assess(self.run_dir, now, self.window_s, master_pid=self.master_pid)
        body: dict[str, object] = {
            "status": "healthy" if liveness.healthy else "unhealthy",
            "uptime": round(time.monotonic() - self._started, 3),
            "timestamp": iso(now),
            "workers": [worker.as_json() for worker in liveness.workers],
        }
        if not liveness.healthy:
            body["reason"] = "; ".join(liveness.problems)
            resp.status = falcon.HTTP_503
        resp.media = body
        resp.cache_control = [NO_STORE]


class ReadyResource:
    """Readiness: the queue's database answers within the timeout."""

    def __init__(self, probe: ReadinessProbe) -> None:
        self.probe = probe

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        readiness = self.probe.check()
        body: dict[str, object] = {
            "status": "ready" if readiness.ready else "not ready",
            "timestamp": iso(time.time()),
            "latency_ms": readiness.latency_ms,
        }
        if not readiness.ready:
            body["reason"] = readiness.reason
            resp.status = falcon.HTTP_503
        resp.media = body
        resp.cache_control = [NO_STORE]


class MetricsResource:
    """The Prometheus text format, rendered by prometheus-client."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = generate_latest(self.registry)
        resp.content_type = CONTENT_TYPE_LATEST
        resp.cache_control = [NO_STORE]


def _json_error(req: falcon.Request, resp: falcon.Response, exception: falcon.HTTPError) -> None:
    """Every error as JSON, whatever the client accepts; Falcon's default would send XML or nothing."""
    body = {"status": "error", **exception.to_dict()}
    resp.data = json.dumps(body).encode()
    resp.content_type = falcon.MEDIA_JSON
    resp.cache_control = [NO_STORE]


def create_app(
    *,
    run_dir: Path,
    heartbeat_stale_ms: int,
    probe: ReadinessProbe,
    cache: StatsCache,
    master_pid: int | None = None,
) -> falcon.App[falcon.Request, falcon.Response]:
    """The health app over a run folder of heartbeat files, a readiness probe and the cached queue stats.

    With `master_pid`, only the workers of that dramatiq main process count (several local runs may share
    a run folder); without it (the gunicorn sidecar), every heartbeat file does.
    """
    app = falcon.App()
    app.set_error_serializer(_json_error)
    app.add_route("/health", HealthResource(run_dir, heartbeat_stale_ms / 1000, master_pid))
    app.add_route("/ready", ReadyResource(probe))
    app.add_route("/metrics", MetricsResource(build_registry(cache, run_dir, master_pid)))
    return app
