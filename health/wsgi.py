"""The health app for the gunicorn CLI, run as a sidecar beside the dramatiq workers:

    gunicorn health.wsgi:app -b 0.0.0.0:8080 --no-control-socket \\
        --logger-class health.gunicorn_logging.StandaloneGunicornLogger

It must share the workers' RUN_DIR folder and see their pids (one container, or a shared process namespace).
Importing this module builds the settings, logging and transport, and starts the queue monitor: keep the
default single gunicorn worker, or each worker would log its own queue statistics.
"""

from __future__ import annotations

from health.runtime import build_runtime
from service.logs import configure_logging
from service.settings import load_settings

settings = load_settings()
configure_logging(settings)
runtime = build_runtime(settings)
runtime.monitor.start()
app = runtime.app

__all__ = ["app"]
