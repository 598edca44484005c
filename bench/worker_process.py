"""One `dramatiq <module> --processes 1 --threads N` run, from start to the stopwatch's file, then stopped."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.environment import EXPECTED_JOBS_ENV, PROCESSES_ENV, RESULT_FILE_ENV, THREADS_ENV
from bench.targets import BenchError

ROOT = Path(__file__).resolve().parent.parent
#: Seconds between looks for the stopwatch's file; the timing itself is taken inside the worker.
RESULT_POLL_S = 0.05
#: Seconds the CLI gets to stop its worker after SIGTERM before the whole process group is killed.
STOP_TIMEOUT_S = 30.0
#: Lines of the worker's log shown when a run fails.
LOG_TAIL_LINES = 40


@dataclasses.dataclass(frozen=True)
class WorkerRun:
    """What the stopwatch saw in one worker process, and when the process was started."""

    settled: int
    failed: int
    first_to_last_s: float
    startup_s: float
    pid: int

    @property
    def jobs_per_s(self) -> float:
        """Settled jobs per second between the first and the last: n - 1 intervals."""
        return (self.settled - 1) / self.first_to_last_s if self.first_to_last_s > 0 else float("nan")


def dramatiq_command(module: str, threads: int, processes: int = 1) -> list[str]:
    """The CLI as an operator runs it: the `dramatiq` script beside this interpreter."""
    script = Path(sys.executable).with_name("dramatiq")
    return [str(script), module, "--processes", str(processes), "--threads", str(threads)]


def run_worker(
    module: str,
    *,
    env: dict[str, str],
    threads: int,
    jobs: int,
    work_dir: Path,
    timeout_s: float,
    on_started: Callable[[int], None] | None = None,
    processes: int = 1,
) -> WorkerRun:
    """Start the CLI, wait until its stopwatch has seen `jobs` settled jobs, stop it; BenchError otherwise.

    `on_started(pid)` is called once the process runs (the profiler attaches there).
    """
    result_path = work_dir / "stopwatch.json"
    for old in work_dir.glob("stopwatch.json*"):
        old.unlink()
    log_path = work_dir / "worker.log"
    full_env = {
        **os.environ,
        **env,
        THREADS_ENV: str(threads),
        PROCESSES_ENV: str(processes),
        EXPECTED_JOBS_ENV: str(jobs),
        RESULT_FILE_ENV: str(result_path),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with log_path.open("wb") as log:
        started_at = time.time()
        # A session of its own: on any way out, the CLI and its worker process can be killed as one group.
        proc = subprocess.Popen(
            dramatiq_command(module, threads, processes),
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            if on_started is not None:
                on_started(proc.pid)
            deadline = time.monotonic() + timeout_s
            if processes == 1:
                result = _wait_for_result(proc, result_path, log_path, deadline)
            else:
                result = _wait_for_shared_result(proc, result_path, jobs, log_path, deadline)
        finally:
            _stop(proc)
    return WorkerRun(
        settled=int(result["settled"]),
        failed=int(result["failed"]),
        first_to_last_s=float(result["first_to_last_s"]),
        startup_s=float(result["first_settled_at"]) - started_at,
        pid=int(result["pid"]),
    )


def _wait_for_result(
    proc: subprocess.Popen[bytes], result_path: Path, log_path: Path, deadline: float
) -> dict[str, Any]:
    while not result_path.exists():
        if proc.poll() is not None:
            raise BenchError(
                f"the worker exited with code {proc.returncode} before the last job:\n{_tail(log_path)}"
            )
        if time.monotonic() >= deadline:
            raise BenchError(f"the worker did not settle every job in time:\n{_tail(log_path)}")
        time.sleep(RESULT_POLL_S)
    data: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
    return data


def _wait_for_shared_result(
    proc: subprocess.Popen[bytes], result_path: Path, jobs: int, log_path: Path, deadline: float
) -> dict[str, Any]:
    """Several processes' progress files (bench/stopwatch.py), added up once they count `jobs`."""
    while True:
        parts = []
        for path in result_path.parent.glob(f"{result_path.name}.*"):
            if not path.name.endswith(".partial"):
                with contextlib.suppress(OSError, ValueError):
                    parts.append(json.loads(path.read_text(encoding="utf-8")))
        if sum(int(part["settled"]) for part in parts) >= jobs:
            return {
                "settled": jobs,
                "failed": sum(int(part["failed"]) for part in parts),
                "first_settled_at": min(float(part["first_settled_at"]) for part in parts),
                "first_to_last_s": max(float(part["latest_perf_s"]) for part in parts)
                - min(float(part["first_perf_s"]) for part in parts),
                "pid": parts[0]["pid"],
                "processes_settling": len(parts),
            }
        if proc.poll() is not None:
            raise BenchError(
                f"the worker exited with code {proc.returncode} before the last job:\n{_tail(log_path)}"
            )
        if time.monotonic() >= deadline:
            raise BenchError(f"the workers did not settle every job in time:\n{_tail(log_path)}")
        time.sleep(RESULT_POLL_S)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the CLI, which stops its worker gracefully; the whole group is killed if that hangs."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)
    # The worker process may outlive a CLI that died: the group goes either way.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(log_path: Path) -> str:
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no worker log)"
    return "\n".join(lines[-LOG_TAIL_LINES:])
