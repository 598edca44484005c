"""The Heartbeat middleware: each worker process writes its heartbeat file about once a second."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from dramatiq import Broker, Middleware, Worker
from dramatiq.broker import MessageProxy
from dramatiq.message import Message
from loguru import logger

from health.job_counters import DURATION_BOUNDS_S, JobCounters
from health.run_folder import WorkerBeat, process_start, remove_beat, remove_ended_beats, write_beat
from service.settings import Settings

#: Seconds between heartbeat writes; HEARTBEAT_STALE_MS must leave room for a consumer tick plus this.
HEARTBEAT_INTERVAL_S = 1.0


class TickingBroker(Protocol):
    """What the heartbeat reads from the broker: its id and its consumers' last sign of life."""

    worker_id: str
    #: Epoch seconds of the last consumer iteration in this process.
    last_tick: float

    def background_threads(self) -> list[Any]:
        """The broker's supervised threads (dataclasses with name, alive, last_tick, ...)."""
        ...


class Heartbeat(Middleware):
    """Writes `<run_dir>/worker-<pid>.json` from a daemon thread while the worker runs.

    The beat carries the broker's `last_tick`, so a wedged consumer goes stale even though this thread is
    fine, and a frozen process (SIGSTOP) goes stale because this thread is frozen too. Job counts ride
    along for the health server's /metrics.
    """

    def __init__(self, settings: Settings, broker: TickingBroker) -> None:
        self.run_dir: Path = settings.run_path
        self.broker = broker
        self.counters = JobCounters()
        self._pid = 0
        self._master_pid: int | None = None
        self._process_start: str | None = None
        self._started_at = 0.0
        self._stopping = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_failed = False

    # -- lifecycle ---------------------------------------------------------------------------------------
    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self._pid = os.getpid()
        self._master_pid = os.getppid()
        self._process_start = process_start(self._pid)
        self._started_at = time.time()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_ended_beats(self.run_dir)
        if removed:
            logger.bind(pids=removed).info("Removed heartbeat files of worker processes that are gone")
        # The first beat is written before the health server can look, so a booted worker is never missing.
        self.beat()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        # Consumers stop ticking while running jobs finish; the process is draining, not wedged.
        self._stopping = True
        self.beat()

    def after_broker_close(self, broker: Broker) -> None:
        """The broker has handed back its jobs and left the queue: the process is done; so is its file.

        Not at after_worker_shutdown: the broker's close (flushing acks, handing back jobs, leaving the
        registry) comes after it, and the health server must count this process alive until it is gone.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * HEARTBEAT_INTERVAL_S)
        remove_beat(self.run_dir, self._pid)

    # -- job counts --------------------------------------------------------------------------------------
    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        self.counters.started(message.message_id)

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        self.counters.finished(
            message.message_id, message.queue_name, message.actor_name, errored=exception is not None
        )

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self.counters.skipped(message.message_id)

    def after_enqueue(self, broker: Broker, message: Message[Any], delay: int) -> None:
        # Dramatiq's Retries re-enqueues the very message that raised: that is a retry.
        self.counters.reenqueued(message.message_id, message.queue_name, message.actor_name)

    def after_ack(self, broker: Broker, message: MessageProxy) -> None:
        self.counters.settled(message.message_id, message.queue_name, message.actor_name, failed=False)

    def after_nack(self, broker: Broker, message: MessageProxy) -> None:
        self.counters.settled(message.message_id, message.queue_name, message.actor_name, failed=True)

    # -- the beat ----------------------------------------------------------------------------------------
    def beat(self) -> None:
        """Write this process's heartbeat file now."""
        now = time.time()
        snapshot = self.counters.snapshot()
        write_beat(
            self.run_dir,
            WorkerBeat(
                pid=self._pid,
                worker_id=self.broker.worker_id,
                process_start=self._process_start,
                started_at=self._started_at,
                heartbeat_at=now if self._stopping else self.broker.last_tick,
                written_at=now,
                state="stopping" if self._stopping else "running",
                jobs_in_progress=snapshot.in_progress,
                jobs_processed=snapshot.processed,
                jobs=snapshot.jobs,
                duration_bounds_s=DURATION_BOUNDS_S,
                master_pid=self._master_pid,
                threads=tuple(dataclasses.asdict(status) for status in self.broker.background_threads()),
            ),
        )

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.beat()
            except Exception as exc:
                # Keep beating: a full disk may clear. Say so once, not every second.
                if not self._write_failed:
                    logger.bind(run_dir=str(self.run_dir)).warning(
                        "Could not write the heartbeat file: {}", exc
                    )
                self._write_failed = True
            else:
                self._write_failed = False
