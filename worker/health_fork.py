"""The health server (and the dashboard, when DASHBOARD_PORT is set) as forks of the dramatiq CLI, the way
Dramatiq's Prometheus middleware runs its exporter."""

from __future__ import annotations

from collections.abc import Callable

from dramatiq import Middleware

from health.dashboard.server import serve_dashboard_in_fork
from health.server import serve_in_fork


class HealthServer(Middleware):
    """Declares the health server (and the dashboard) as processes for Dramatiq's main process to fork.

    The main process starts them once the worker processes have booted and sends them SIGTERM when it stops.
    """

    def __init__(self, *, dashboard: bool = False) -> None:
        self.dashboard = dashboard

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [serve_in_fork, serve_dashboard_in_fork] if self.dashboard else [serve_in_fork]
