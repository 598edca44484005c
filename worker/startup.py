"""The worker process's start-up checks: before it claims anything, or not at all.

Dramatiq's CLI emits `process_boot` in each worker process right after importing the broker module and before
the worker threads start; only worker processes emit it, never a producer that imports `tasks`. There the
worker says how its command line compares with the settings, makes sure its health port is free (a worker
without its probe endpoint would run half-healthy), and checks the queue: credentials and schema. A failed
check ends the process with one critical line and the exit code that says whether a restart can help; the
dramatiq main process then stops the others and exits with the same code.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import NoReturn

from dramatiq import Broker, Middleware
from loguru import logger

from broker.errors import ConnectionClosed, QueueAccessDenied, QueueError, QueueSchemaMissing
from broker.transport import Transport
from service.exit_codes import EXIT_CONFIGURATION, EXIT_UNREACHABLE
from service.settings import Settings
from worker.cli import cli_arguments, flag_differences


class StartupChecks(Middleware):
    """Runs the checks above in `after_process_boot`; add it last, so that its hook runs first."""

    def __init__(self, settings: Settings, transport: Transport, *, health_port: int | None) -> None:
        self.settings = settings
        self.transport = transport
        self.health_port = health_port

    def after_process_boot(self, broker: Broker) -> None:
        report_cli_flags(self.settings, sys.argv)
        if self.health_port is not None:
            check_port_free(self.health_port)
        check_queue(self.transport)


def report_cli_flags(settings: Settings, argv: list[str]) -> None:
    """One warning line when the dramatiq command line asks for other numbers than the settings."""
    arguments = cli_arguments(argv)
    if arguments is None:
        return
    differences = flag_differences(settings, arguments, argv)
    if differences:
        logger.warning(
            "The dramatiq command line's flags differ from the settings: {}. `python -m service.launch` "
            "passes the settings as these flags.",
            "; ".join(differences),
        )


def check_port_free(port: int) -> None:
    """End the process when something else listens on the health port, as gunicorn's bind would find it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # gunicorn binds with SO_REUSEADDR too: then only a listening socket conflicts, not a closing one,
        # and the worker processes of one CLI may all check at once.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            stop(
                EXIT_CONFIGURATION,
                f"HEALTH_CHECK_PORT {port} is already in use: another process listens there, so this worker "
                "would run without /health and /ready. Free the port or set another HEALTH_CHECK_PORT.",
            )


def check_queue(transport: Transport) -> None:
    """End the process when the queue refuses us (2: fix the configuration) or does not answer (3: retry)."""
    try:
        transport.check_schema()
    except (QueueSchemaMissing, QueueAccessDenied) as exc:
        stop(EXIT_CONFIGURATION, str(exc))
    except ConnectionClosed as exc:
        stop(EXIT_UNREACHABLE, f"Cannot reach the queue ({exc}); check DATABASE_URL or SUPABASE_URL.")
    except QueueError as exc:
        stop(EXIT_CONFIGURATION, f"The queue refused its start-up check: {exc}")


def stop(code: int, message: str) -> NoReturn:
    """End this worker process with one critical line; no traceback, the message says it all."""
    logger.bind(exit_code=code).critical("{}", message)
    # SystemExit passes through Dramatiq's hook runner (it catches Exception only) and ends the process.
    raise SystemExit(code)
