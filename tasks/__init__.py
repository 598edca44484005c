"""The queue's entry point: `dramatiq tasks` imports this module, and so do producers.

Importing it reads the settings, builds the broker over the queue (no connection opens until one is
needed), makes it Dramatiq's global broker and declares the actors. It says which queue that is.

Producers get the broker here, before declaring actors of their own: `from tasks import broker`. Problems
reach them as exceptions (ConfigurationError, BrokerConflict, the queue's errors when they send), never as an
exit.

In a worker process of the dramatiq CLI the module also sets up the logs, and its middleware checks the
health port and the queue before any job is claimed (`worker.startup`): there a configuration mistake ends the
process with exit code 2, and a queue that cannot be reached with 3 (Dramatiq's RET_CONNECT).
"""

from __future__ import annotations

import sys

import dramatiq
import dramatiq.broker
from dramatiq.middleware import CurrentMessage
from loguru import logger

from broker.broker import SupabaseBroker
from broker.log_context import JobLogContext
from jobs.coding import CodingJob, declare_coding_actor
from service.errors import BrokerConflict, ConfigurationError, ServiceError
from service.exit_codes import EXIT_CONFIGURATION
from service.logs import configure_logging, report_configuration_error
from service.settings import Settings, load_settings
from service.transports import describe_queue
from service.wiring import build_broker
from worker.cli import in_dramatiq_worker
from worker.health_fork import HealthServer
from worker.heartbeat import Heartbeat
from worker.periodic import Periodic
from worker.startup import StartupChecks


def _wire(worker_process: bool) -> tuple[Settings, SupabaseBroker]:
    settings = load_settings()
    if worker_process:
        # Straight to the process's own stderr, not the pipe the dramatiq CLI hands its worker processes: the
        # main process stops reading that pipe as soon as they exit, which lost their last lines. Each line
        # is one write, so lines of several processes do not interleave.
        configure_logging(settings, stream=sys.__stderr__)
    broker = build_broker(settings)
    current = dramatiq.broker.global_broker
    if current is not None:
        raise BrokerConflict(current)
    dramatiq.set_broker(broker)
    logger.info("Queue: {}", describe_queue(settings))
    return settings, broker


_worker_process = in_dramatiq_worker()
try:
    settings, broker = _wire(_worker_process)
except ServiceError as exc:
    if not _worker_process:
        raise
    # The worker process's entry point: its exit code, with one message and no traceback.
    if isinstance(exc, ConfigurationError):
        report_configuration_error(exc, logger_name=__name__)
    else:
        logger.critical("{}", exc)
    raise SystemExit(EXIT_CONFIGURATION) from None

broker.add_middleware(CurrentMessage())
# First, so that its after-hooks run last and the other middlewares' lines about a job carry its ids.
broker.add_middleware(JobLogContext(worker_id=broker.worker_id), before=type(broker.middleware[0]))
# Heartbeat files for liveness and metrics; the health server runs as a dramatiq fork of this CLI.
broker.add_middleware(Heartbeat(settings, broker))
broker.add_middleware(HealthServer(dashboard=settings.dashboard_port is not None))
# Actors declared with `periodic=<cron>` are enqueued on every tick, once however many workers run.
broker.add_middleware(Periodic())
# Last, so that its process_boot hook runs first (after-hooks run in reverse): nothing starts before it.
broker.add_middleware(StartupChecks(settings, broker.transport, health_port=settings.health_check_port))

run_coding_job = declare_coding_actor(broker, CodingJob(settings))

__all__ = ["broker", "run_coding_job", "settings"]
