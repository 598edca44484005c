"""The dashboard's server: gunicorn on DASHBOARD_PORT, as a fork of the dramatiq CLI (like the health server)
or standalone beside the workers (`gunicorn health.dashboard.wsgi:app -b 0.0.0.0:8081`).

Its own process and port, so a busy dashboard never slows /health, and a container without DASHBOARD_PORT
runs none of it.
"""

from __future__ import annotations

import sys
from typing import Any

import falcon
from gunicorn.app.base import BaseApplication
from loguru import logger

from broker.transport import Transport
from health.dashboard.app import create_dashboard_app
from health.gunicorn_logging import LoguruGunicornLogger
from service.logs import configure_logging
from service.settings import Settings, load_settings
from service.transports import build_dashboard_transport

#: Request threads of the dashboard's one gunicorn worker.
DASHBOARD_THREADS = 4
#: Seconds gunicorn's worker gets to finish requests in flight when it stops.
DASHBOARD_GRACEFUL_TIMEOUT_S = 2


def build_dashboard(
    settings: Settings, transport: Transport | None = None
) -> tuple[falcon.App[falcon.Request, falcon.Response], Transport]:
    """The dashboard app over the settings' transport (or the one given)."""
    transport = transport or build_dashboard_transport(settings)
    return create_dashboard_app(transport, settings.dashboard_token), transport


def serve_dashboard_in_fork() -> int:
    """Run the dashboard until SIGTERM; the entry point of its fork of the dramatiq CLI."""
    settings = load_settings()
    configure_logging(settings, stream=sys.__stderr__)
    if settings.dashboard_port is None:
        return 0
    logger.bind(port=settings.dashboard_port, actions=settings.dashboard_token is not None).info(
        "Starting the dashboard"
    )
    DashboardApplication(settings).run()
    return 0


class DashboardApplication(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured in code: one gthread worker on DASHBOARD_PORT."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.transport: Transport | None = None
        super().__init__()

    def load_config(self) -> None:
        options: dict[str, Any] = {
            "bind": [f"0.0.0.0:{self.settings.dashboard_port}"],
            "workers": 1,
            "worker_class": "gthread",
            "threads": DASHBOARD_THREADS,
            "graceful_timeout": DASHBOARD_GRACEFUL_TIMEOUT_S,
            "control_socket_disable": True,
            "logger_class": LoguruGunicornLogger,
            "proc_name": "worker-dashboard",
            "worker_exit": self._worker_exit,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> falcon.App[falcon.Request, falcon.Response]:
        # In gunicorn's worker process, after its fork: the transport's connections live where they are used.
        app, self.transport = build_dashboard(self.settings)
        return app

    def _worker_exit(self, arbiter: Any, worker: Any) -> None:
        if self.transport is not None:
            self.transport.close()
