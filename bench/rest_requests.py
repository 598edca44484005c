"""HTTP requests per job and jobs/s of the broker over the REST transport, against the test endpoint.

Usage: .venv/bin/python bench/rest_requests.py [--jobs 2000] [--rounds 3] [--threads 8] [--database-url URL]

Not a real PostgREST: the endpoint is tests/support/postgrest.py, a stdlib HTTP server that forwards each RPC
to the local PostgreSQL, run in a process of its own as PostgREST would be. The figures say what the broker
asks of the API (requests per job, per RPC, counted by the endpoint) and what this stand-in lets through;
a real PostgREST behind Supabase's gateway, over a real network, answers at other speeds.

Each round: a fresh migrated database; N no-op jobs pre-loaded through the transport's `enqueue_jobs`
(counted apart: a producer's `send()` is one request per job, a batch is one per batch); then an in-process
dramatiq.Worker (8 threads, Dramatiq's default prefetch of 2 per thread) with a SupabaseBroker over
RestTransport drains them. Realtime is off: with a backlog, claims follow capacity, not wake-ups. jobs/s is
timed from the first ack to the N-th, as bench/throughput.py does; requests are counted from the worker's
start to its broker's close. The Markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: the repository root holds the `bench` package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dramatiq
import psycopg
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware
from psycopg import sql

from bench.environment import DEFAULT_ADMIN_URL, DEFAULT_THREADS
from bench.noop_actors import declare_actor
from broker.broker import SupabaseBroker
from broker.messages import new_job
from broker.rest import SPARE_CONNECTIONS, RestTransport

#: Jobs per enqueue_jobs request when pre-loading.
ENQUEUE_BATCH = 1_000
#: Milliseconds between polls of an idle queue: only the end of a round is idle.
POLL_INTERVAL_MS = 1_000
#: Milliseconds a worker thread waits on an empty work queue before checking whether it should stop.
WORKER_TIMEOUT_MS = 100
#: Milliseconds Worker.stop may wait for running jobs.
STOP_TIMEOUT_MS = 10_000
#: Seconds a round may take beyond what the slowest plausible rate needs.
MIN_ROUND_TIMEOUT_S = 60.0
SLOWEST_RATE_PER_S = 50
#: Seconds the endpoint process may take to start or answer.
ENDPOINT_TIMEOUT_S = 30.0
LABEL = "against the test endpoint (stdlib server forwarding to local PostgreSQL), not a real PostgREST"


class BenchError(Exception):
    """Raised when a round cannot run or its result does not add up; the message says what was seen."""


@dataclass(frozen=True)
class Round:
    """One round's figures."""

    jobs: int
    jobs_per_s: float
    requests: dict[str, int]

    @property
    def requests_per_job(self) -> float:
        return sum(self.requests.values()) / self.jobs


class Endpoint:
    """The test endpoint in a child process: its URL and key, and its request counts on demand."""

    def __init__(self, database_url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(database_url, child), daemon=True)
        self._process.start()
        child.close()
        started: dict[str, str] = self._receive()
        self.url, self.service_role_key = started["url"], started["service_role_key"]

    def calls(self) -> collections.Counter[str]:
        """Requests the endpoint has served so far, per RPC name."""
        self._conn.send("calls")
        return collections.Counter(self._receive())

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the endpoint process already ended
            self._conn.send("stop")
        self._process.join(ENDPOINT_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()

    def _receive(self) -> Any:
        if not self._conn.poll(ENDPOINT_TIMEOUT_S):
            raise BenchError("the test endpoint did not answer")
        return self._conn.recv()


def _serve(database_url: str, conn: Connection) -> None:
    """The endpoint process: serve until told to stop, answering "calls" with the request counts."""
    from tests.support.postgrest import running_postgrest

    with running_postgrest(database_url) as endpoint:
        conn.send({"url": endpoint.url, "service_role_key": endpoint.service_role_key})
        while conn.recv() == "calls":
            conn.send(dict(endpoint.calls))


class AckClock(Middleware):
    """Notes the time of the first and of the `expected`-th settled job."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.settled = 0
        self.failed = 0
        self.first_s = self.last_s = 0.0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def after_ack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._settle()

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        with self._lock:
            self.failed += 1
        self._settle()

    def _settle(self) -> None:
        with self._lock:
            self.settled += 1
            if self.settled == 1:
                self.first_s = time.perf_counter()
            if self.settled == self.expected:
                self.last_s = time.perf_counter()
                self.done.set()


@contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A fresh database with the migrations applied; dropped on exit."""
    from service.migrate import apply_migrations

    name = f"bench_rest_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = name
    url = psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items() if v is not None})
    try:
        apply_migrations(url, bootstrap=True)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def run_round(round_no: int, args: argparse.Namespace) -> Round:
    with scratch_database(args.database_url) as url:
        endpoint = Endpoint(url)
        try:
            return _drain(round_no, url, endpoint, args)
        finally:
            endpoint.close()


def _drain(round_no: int, url: str, endpoint: Endpoint, args: argparse.Namespace) -> Round:
    transport = RestTransport(
        endpoint.url,
        endpoint.service_role_key,
        max_connections=args.threads + SPARE_CONNECTIONS,
        realtime=False,
    )
    broker = SupabaseBroker(
        transport,
        poll_interval_ms=POLL_INTERVAL_MS,
        claim_ahead=args.claim_ahead,
        concurrency=None if args.claim_ahead is None else args.threads,
    )
    clock = AckClock(args.jobs)
    broker.add_middleware(clock)
    noop = declare_actor(broker)
    try:
        _say(f"round {round_no}: pre-loading {args.jobs} jobs ...")
        for start in range(0, args.jobs, ENQUEUE_BATCH):
            batch = min(ENQUEUE_BATCH, args.jobs - start)
            transport.enqueue([new_job(noop.message(), default_max_retries=0) for _ in range(batch)])
        before = endpoint.calls()

        _say(f"round {round_no}: draining them with {args.threads} threads ...")
        worker = dramatiq.Worker(broker, worker_threads=args.threads, worker_timeout=WORKER_TIMEOUT_MS)
        worker.start()
        try:
            if not clock.done.wait(MIN_ROUND_TIMEOUT_S + args.jobs / SLOWEST_RATE_PER_S):
                raise BenchError(f"only {clock.settled} of {args.jobs} jobs settled in time")
        finally:
            worker.stop(timeout=STOP_TIMEOUT_MS)
    finally:
        broker.close()  # completes the last batch of acks: their requests count too
    requests = endpoint.calls() - before

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("select status::text, count(*) from public.coding_jobs group by 1").fetchall()
    statuses: dict[str, int] = {str(status): int(n) for status, n in rows}
    if clock.failed or statuses != {"completed": args.jobs}:
        raise BenchError(f"expected {args.jobs} completed jobs, found {statuses} ({clock.failed} failed)")
    jobs_per_s = (args.jobs - 1) / (clock.last_s - clock.first_s)
    result = Round(jobs=args.jobs, jobs_per_s=jobs_per_s, requests=dict(requests))
    _say(f"round {round_no}: {jobs_per_s:,.0f} jobs/s, {result.requests_per_job:.3f} requests per job")
    return result


def render_markdown(rounds: list[Round], args: argparse.Namespace, load_before: tuple[float, ...]) -> str:
    rpcs = sorted({name for r in rounds for name in r.requests}, key=lambda n: -rounds[0].requests.get(n, 0))
    median_rate = statistics.median(r.jobs_per_s for r in rounds)
    lines = [
        f"REST transport, **{LABEL}**.",
        f"{args.jobs:,} pre-loaded no-op jobs per round, one in-process dramatiq.Worker with {args.threads} "
        f"threads ({_configuration(args)}), Realtime off, {len(rounds)} round(s); "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"Dramatiq {dramatiq.__version__}, load average before/after: {load_before[0]:.2f} / "
        f"{os.getloadavg()[0]:.2f}.",
        "",
        "| Figure | " + " | ".join(f"round {i}" for i in range(1, len(rounds) + 1)) + " | median |",
        "|---|" + "---:|" * (len(rounds) + 1),
        _row("jobs/s (first ack to last)", [r.jobs_per_s for r in rounds], "{:,.0f}"),
        _row("HTTP requests per job", [r.requests_per_job for r in rounds], "{:.3f}"),
    ]
    for name in rpcs:
        per_job = [r.requests.get(name, 0) / r.jobs for r in rounds]
        lines.append(_row(f"`{name}` requests per job", per_job, "{:.3f}"))
    for name in ("claim_jobs", "complete_jobs"):
        per_request = [r.jobs / r.requests[name] if r.requests.get(name) else 0.0 for r in rounds]
        lines.append(_row(f"jobs per `{name}` request", per_request, "{:.1f}"))
    lines += [
        "",
        f"Median {median_rate:,.0f} jobs/s {LABEL}. Not counted above: the producer's side "
        "(`send()` is one `enqueue_jobs` request per job; the pre-load sent "
        f"{ENQUEUE_BATCH:,} per request; `enqueue_many()` sends up to 5,000 per request), and the worker's "
        "`worker_heartbeat` (one request every 4 s per worker process, leases and rescues included, whatever "
        "the number of jobs).",
    ]
    return "\n".join(lines)


def _configuration(args: argparse.Namespace) -> str:
    if args.claim_ahead is None:
        return f"Dramatiq's prefetch, {args.threads * 2}"
    return f"the service's CLAIM_AHEAD_JOBS={args.claim_ahead}"


def _row(title: str, values: Sequence[float], fmt: str) -> str:
    cells = [fmt.format(v) for v in values] + [fmt.format(statistics.median(values))]
    return f"| {title} | " + " | ".join(cells) + " |"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2_000, help="no-op jobs per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="worker threads (default 8)")
    parser.add_argument(
        "--claim-ahead",
        type=int,
        default=None,
        help="CLAIM_AHEAD_JOBS, with MAX_CONCURRENT_JOBS = --threads (default: Dramatiq's prefetch)",
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_ADMIN_URL,
        help=f"superuser URL; scratch databases go there (default {DEFAULT_ADMIN_URL})",
    )
    args = parser.parse_args(argv)
    if args.jobs < 2 or args.rounds < 1 or args.threads < 1:
        parser.error("--jobs must be at least 2, --rounds and --threads at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    try:
        rounds = [run_round(round_no, args) for round_no in range(1, args.rounds + 1)]
    except (BenchError, psycopg.Error) as exc:
        _say(f"benchmark failed: {exc}")
        return 1
    print(render_markdown(rounds, args, load_before))
    return 0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
