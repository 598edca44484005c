"""The health server as a fork of the dramatiq CLI, as Dramatiq's Prometheus middleware runs its exporter."""

from __future__ import annotations

from collections.abc import Callable

from dramatiq import Middleware

from health.server import serve_in_fork


class HealthServer(Middleware):
    """Declares the health server as a process for Dramatiq's main process to fork and stop.

    The main process starts it once the worker processes have booted and sends it SIGTERM when it stops.
    """

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [serve_in_fork]
