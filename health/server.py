"""The health server inside the dramatiq process tree: the fork that runs gunicorn.

Dramatiq's main process starts `serve_in_fork` in a process of its own once the worker processes have booted
(declared by `worker.health_fork.HealthServer`), and sends it SIGTERM when it stops. gunicorn's
arbiter replaces the fork's SIGTERM handler with its own; ours keeps serving until the worker processes
have finished their jobs and gone (or the shutdown timeout passes), then closes the port and exits 0.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import falcon
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from loguru import logger

from health.gunicorn_logging import LoguruGunicornLogger
from health.liveness import live_worker_pids
from health.runtime import HealthRuntime, build_runtime
from service.logs import configure_logging
from service.settings import Settings, load_settings

#: Request threads of the one gunicorn worker: probes are few and quick.
HEALTH_THREADS = 4
#: Seconds gunicorn's worker gets to finish requests in flight when it stops.
GRACEFUL_TIMEOUT_S = 3
#: Seconds the arbiter lets its worker go silent before restarting it.
WORKER_TIMEOUT_S = 30
#: Seconds the health server outlives the worker processes' shutdown timeout, at most.
DRAIN_MARGIN_S = 5.0


def serve_in_fork() -> int:
    """Run the health server until SIGTERM; the entry point of the fork process."""
    settings = load_settings()
    # Straight to the process's real stderr, not the pipe Dramatiq gives its children: the main process stops
    # copying that pipe as soon as the worker processes exit, and this server outlives them on purpose.
    configure_logging(settings, stream=sys.__stderr__)
    logger.bind(port=settings.health_check_port).info("Starting the health server")
    HealthApplication(settings).run()
    return 0


class HealthApplication(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured in code: one gthread worker, a short graceful timeout, no control socket."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: The dramatiq main process: this fork's parent, and the parent of the workers it reports on.
        self.dramatiq_pid = os.getppid()
        self.runtime: HealthRuntime | None = None
        super().__init__()

    def load_config(self) -> None:
        options: dict[str, Any] = {
            "bind": [f"0.0.0.0:{self.settings.health_check_port}"],
            "workers": 1,
            "worker_class": "gthread",
            "threads": HEALTH_THREADS,
            "graceful_timeout": GRACEFUL_TIMEOUT_S,
            "timeout": WORKER_TIMEOUT_S,
            # A Unix socket in $HOME for gunicornc: nothing here uses it.
            "control_socket_disable": True,
            "logger_class": LoguruGunicornLogger,
            "proc_name": "worker-health",
            "worker_exit": self._worker_exit,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> falcon.App[falcon.Request, falcon.Response]:
        # Runs in gunicorn's worker process, after its fork: connections and threads live where they are used.
        self.runtime = build_runtime(self.settings, master_pid=self.dramatiq_pid)
        self.runtime.monitor.start()
        return self.runtime.app

    def _worker_exit(self, arbiter: Arbiter, worker: Any) -> None:
        if self.runtime is not None:
            self.runtime.close()

    def run(self) -> None:
        drain_s = self.settings.shutdown_timeout_ms / 1000 + DRAIN_MARGIN_S
        DrainingArbiter(self, self.settings.run_path, self.dramatiq_pid, drain_s).run()


class DrainingArbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's arbiter, except that SIGTERM and SIGINT wait for the worker processes to stop first.

    Dramatiq's main process signals every child at once; the worker processes then take up to the shutdown
    timeout to finish their jobs. Until they are gone /health keeps answering, so the order is: stop
    claiming, finish or release jobs, then close the health server.
    """

    def __init__(self, app: HealthApplication, run_dir: Path, dramatiq_pid: int, drain_s: float) -> None:
        super().__init__(app)
        self.run_dir = run_dir
        self.dramatiq_pid = dramatiq_pid
        self.drain_s = drain_s
        self._drain_deadline: float | None = None

    def handle_term(self) -> None:
        self._begin_drain("SIGTERM")

    def handle_int(self) -> None:
        self._begin_drain("SIGINT")

    def _begin_drain(self, signal_name: str) -> None:
        if self._drain_deadline is not None:
            return
        self._drain_deadline = time.monotonic() + self.drain_s
        logger.bind(signal=signal_name).info("Health server: waiting for the worker processes to stop")

    def manage_workers(self) -> None:
        # Called at least once a second by the arbiter's loop: the place to notice that draining is over.
        if self._drain_deadline is not None:
            remaining = live_worker_pids(self.run_dir, master_pid=self.dramatiq_pid)
            if not remaining or time.monotonic() >= self._drain_deadline:
                if remaining:
                    logger.bind(pids=remaining).warning(
                        "Health server: closing before worker processes stopped"
                    )
                logger.info("Health server: closing")
                raise StopIteration
        super().manage_workers()
