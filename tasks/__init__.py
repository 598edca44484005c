"""The worker's entry point: `dramatiq tasks` imports this module.

Importing it builds the settings, sets up logging and the broker, and declares the actors. A configuration
mistake ends the process with one clear message and exit code 2, before any work starts; a queue that cannot
be reached, with exit code 3 (Dramatiq's own code for it), so the restart policy tries again.
"""

from __future__ import annotations

import sys

import dramatiq
from dramatiq.middleware import CurrentMessage
from loguru import logger

from broker.errors import ConnectionClosed, QueueAccessDenied, QueueSchemaMissing
from broker.log_context import JobLogContext
from jobs.coding import CodingJob, declare_coding_actor
from service.errors import ConfigurationError
from service.logs import configure_logging
from service.settings import Settings, load_settings
from service.wiring import build_broker
from worker.health_fork import HealthServer
from worker.heartbeat import Heartbeat

#: Exit code for configuration and schema mistakes: restarting will not fix them.
EXIT_CONFIGURATION = 2
#: Exit code when the queue cannot be reached at start-up (dramatiq.cli.RET_CONNECT).
EXIT_UNREACHABLE = 3


def _load() -> Settings:
    try:
        return load_settings()
    except ConfigurationError as exc:
        # No settings, so no log format yet: one plain message.
        sys.stderr.write(exc.render() + "\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_CONFIGURATION) from None


settings = _load()
# Straight to the process's own stderr, not the pipe the dramatiq CLI hands its worker processes: the main
# process stops reading that pipe as soon as they exit, which lost their last lines ("Worker has been shut
# down"). Each line is one write, so lines of several processes do not interleave.
configure_logging(settings, stream=sys.__stderr__)
try:
    broker = build_broker(settings)
except (QueueSchemaMissing, QueueAccessDenied) as exc:
    logger.critical("{}", exc)
    raise SystemExit(EXIT_CONFIGURATION) from None
except ConnectionClosed as exc:
    logger.critical("Cannot reach the queue ({}); check DATABASE_URL or SUPABASE_URL.", exc)
    raise SystemExit(EXIT_UNREACHABLE) from None
broker.add_middleware(CurrentMessage())
# First, so that its after-hooks run last and the other middlewares' lines about a job carry its ids.
broker.add_middleware(JobLogContext(worker_id=broker.worker_id), before=type(broker.middleware[0]))
# Heartbeat files for liveness and metrics; the health server runs as a dramatiq fork of this CLI.
broker.add_middleware(Heartbeat(settings, broker))
broker.add_middleware(HealthServer())
dramatiq.set_broker(broker)

run_coding_job = declare_coding_actor(broker, CodingJob(settings))

__all__ = ["broker", "run_coding_job", "settings"]
