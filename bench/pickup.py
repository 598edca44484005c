"""Pickup latency: how long a job sent to an idle worker takes to start running, p50 and p95.

The harness sends one stamp job at a time (bench/stamp.py) to a running `dramatiq` worker process and waits
for the actor's datagram before it sleeps a random gap and sends the next: every job finds the worker idle.
Short gaps (tens of milliseconds) show the path itself; long gaps (seconds) show what an idle worker adds
when it has been asleep (the 90 ms tail issue 9 found). Latency runs from just before `send()` to the actor's
first line, both on CLOCK_MONOTONIC.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.environment import EXPECTED_JOBS_ENV, PROCESSES_ENV, RESULT_FILE_ENV, THREADS_ENV
from bench.targets import BenchError
from bench.worker_process import ROOT, STOP_TIMEOUT_S, dramatiq_command

#: Seconds a worker may take to boot and pick up its first job.
BOOT_TIMEOUT_S = 60.0
#: Seconds one job may take to be picked up before the run counts as failed.
PICKUP_TIMEOUT_S = 15.0


@dataclasses.dataclass(frozen=True)
class Gaps:
    """How many jobs to send and the idle time before each, drawn uniformly from [low_s, high_s]."""

    samples: int
    low_s: float
    high_s: float


@dataclasses.dataclass(frozen=True)
class Pickups:
    """Latencies in milliseconds, in the order measured."""

    latencies_ms: list[float]

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p95_ms(self) -> float:
        return percentile(self.latencies_ms, 95)


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


class StampListener:
    """The UDP socket the stamp actor reports to."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = int(self.socket.getsockname()[1])

    def drain(self) -> None:
        self.socket.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.socket.recv(256)
        self.socket.setblocking(True)

    def wait_for(self, sent_at: float, timeout_s: float) -> float:
        """Milliseconds from `sent_at` to the start of the job that carried it."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"a job sent to an idle worker was not picked up within {timeout_s:g} s")
            self.socket.settimeout(remaining)
            try:
                data = self.socket.recv(256)
            except TimeoutError:
                continue
            echoed, started = (float(x) for x in data.split())
            if echoed == sent_at:
                return (started - sent_at) * 1000

    def close(self) -> None:
        self.socket.close()


@contextlib.contextmanager
def running_worker(
    module: str, env: dict[str, str], threads: int, log_path: Path, processes: int = 1
) -> Iterator[None]:
    """A `dramatiq <module>` process for the duration; stopped (its group killed if need be) after."""
    full_env = {k: v for k, v in os.environ.items() if k not in (EXPECTED_JOBS_ENV, RESULT_FILE_ENV)}
    full_env.update(env)
    full_env[THREADS_ENV] = str(threads)
    full_env[PROCESSES_ENV] = str(processes)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with log_path.open("wb") as log:
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
            yield
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure(
    send: Callable[[float], None], listener: StampListener, gaps: list[Gaps], rng: random.Random
) -> list[Pickups]:
    """For each Gaps: send its samples one at a time, each after an idle gap; the latencies per Gaps."""
    _warm_up(send, listener)
    results = []
    for gap in gaps:
        latencies = []
        for _ in range(gap.samples):
            time.sleep(rng.uniform(gap.low_s, gap.high_s))
            sent_at = time.monotonic()
            send(sent_at)
            latencies.append(listener.wait_for(sent_at, PICKUP_TIMEOUT_S))
        results.append(Pickups(latencies))
    return results


def _warm_up(send: Callable[[float], None], listener: StampListener) -> None:
    """Wait until the worker runs a job, then a few more: boot and first connections are not pickup."""
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    sent_at = time.monotonic()
    send(sent_at)
    while True:
        try:
            listener.wait_for(sent_at, 1.0)
            break
        except BenchError:
            if time.monotonic() >= deadline:
                raise BenchError(f"the worker ran no job within {BOOT_TIMEOUT_S:g} s") from None
    for _ in range(5):
        time.sleep(0.05)
        sent_at = time.monotonic()
        send(sent_at)
        listener.wait_for(sent_at, PICKUP_TIMEOUT_S)


def describe(pickups: Pickups) -> str:
    values = pickups.latencies_ms
    return (
        f"p50 {pickups.p50_ms:.2f} ms, p95 {pickups.p95_ms:.2f} ms, max {max(values):.1f} ms, "
        f"mean {statistics.fmean(values):.2f} ms (n={len(values)})"
    )
