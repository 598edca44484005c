"""The dashboard for the gunicorn CLI, beside the workers (it needs only the queue, no shared folder):

    gunicorn health.dashboard.wsgi:app -b 0.0.0.0:8081 --no-control-socket \\
        --logger-class health.gunicorn_logging.StandaloneGunicornLogger

Importing this module builds the settings, logging and transport (no connection opens until a page asks).
"""

from __future__ import annotations

from health.dashboard.server import build_dashboard
from service.logs import configure_logging
from service.settings import load_settings

settings = load_settings()
configure_logging(settings)
app, transport = build_dashboard(settings)

__all__ = ["app"]
