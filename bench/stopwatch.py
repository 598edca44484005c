"""A middleware that times a worker process's settled jobs: the first and the last, written to a file."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware

from bench.environment import EXPECTED_JOBS_ENV, PROCESSES_ENV, RESULT_FILE_ENV

#: Seconds between progress files when several worker processes share the jobs.
PROGRESS_EVERY_S = 0.1


class Stopwatch(Middleware):
    """Counts acks and nacks; at the first and at the `expected`-th it notes the time.

    It runs after the broker's own ack returned, on the worker thread, for every broker alike: a counter
    increment per job, and two clock reads per run. itertools.count is atomic under the GIL, so exactly one
    thread sees each number and no lock is taken per job.

    With several worker processes (`shared=True`) no process knows when the last job is settled: each writes
    its count and its first and latest times to `<result file>.<pid>` every PROGRESS_EVERY_S, and the
    harness adds them up (bench/worker_process.py). perf_counter is CLOCK_MONOTONIC, one clock for all.
    """

    def __init__(self, expected_jobs: int, result_path: Path, *, shared: bool = False) -> None:
        self.expected_jobs = expected_jobs
        self.result_path = result_path
        self.shared = shared
        self._settled = itertools.count(1)
        self._failed = itertools.count(1)
        self._count = 0
        self._failures = 0
        self._first_wall_s = 0.0
        self._first_perf_s = 0.0
        self._latest_perf_s = 0.0
        self._written = threading.Event()

    @classmethod
    def from_environ(cls) -> Stopwatch | None:
        """The stopwatch the harness asked for, or None when the module runs outside the harness."""
        expected, path = os.environ.get(EXPECTED_JOBS_ENV), os.environ.get(RESULT_FILE_ENV)
        if not expected or not path:
            return None
        return cls(int(expected), Path(path), shared=int(os.environ.get(PROCESSES_ENV) or 1) > 1)

    def after_ack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._settle()

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._failures = next(self._failed)
        self._settle()

    def _settle(self) -> None:
        n = next(self._settled)
        now = time.perf_counter()
        self._latest_perf_s = now
        self._count = max(self._count, n)
        if n == 1:
            self._first_perf_s = now
            self._first_wall_s = time.time()
            if self.shared:
                threading.Thread(target=self._report_progress, daemon=True).start()
        if n == self.expected_jobs and not self.shared:
            self._write(now, time.time())

    def _report_progress(self) -> None:
        path = self.result_path.with_name(f"{self.result_path.name}.{os.getpid()}")
        while True:
            self._write_json(
                path,
                {
                    "settled": self._count,
                    "failed": self._failures,
                    "first_perf_s": self._first_perf_s,
                    "latest_perf_s": self._latest_perf_s,
                    "first_settled_at": self._first_wall_s,
                    "pid": os.getpid(),
                },
            )
            time.sleep(PROGRESS_EVERY_S)

    def _write(self, last_perf_s: float, last_wall_s: float) -> None:
        if self._written.is_set():
            return
        self._written.set()
        result: dict[str, Any] = {
            "settled": self.expected_jobs,
            "failed": self._failures,
            "first_settled_at": self._first_wall_s,
            "last_settled_at": last_wall_s,
            "first_to_last_s": last_perf_s - self._first_perf_s,
            "pid": os.getpid(),
        }
        self._write_json(self.result_path, result)

    @staticmethod
    def _write_json(path: Path, data: dict[str, Any]) -> None:
        # Written whole, then renamed: the harness polls for the file and must never read half of it.
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(data), encoding="utf-8")
        os.replace(partial, path)
