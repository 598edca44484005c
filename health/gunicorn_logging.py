"""gunicorn's own log lines ("Listening at", "Booting worker") through the service's loguru sink.

Without this, gunicorn writes plain text to stderr, and production logs would not be all JSON. With the
gunicorn CLI use `--logger-class health.gunicorn_logging.StandaloneGunicornLogger`, which also sets up the
service's logging in gunicorn's arbiter process.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from service.errors import ConfigurationError
from service.logs import configure_logging, report_configuration_error
from service.settings import load_settings


class LoguruGunicornLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger with its handlers dropped, so its records reach the root InterceptHandler.

    For a process whose logging is already configured (the health fork).
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True


class StandaloneGunicornLogger(LoguruGunicornLogger):
    """For the gunicorn CLI: configures the service's logging from the settings first."""

    def setup(self, cfg: Any) -> None:
        try:
            configure_logging(load_settings())
        except ConfigurationError as exc:
            # Keep gunicorn's plain handlers; loading the app then fails on the same problems.
            report_configuration_error(exc, logger_name=__name__)
            Logger.setup(self, cfg)
            return
        super().setup(cfg)
