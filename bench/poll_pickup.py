"""Idle pickup latency and idle queries per second behind a transaction pooler, for several ways of polling.

Usage: .venv/bin/python bench/poll_pickup.py [--pickups 12] [--idle-s 15] [--processes 2] [--threads 4]
                                              [--configs today-10000,today-1000,ring-1000,adaptive,...]

Behind a transaction-mode pooler there is no LISTEN, so how soon an idle worker finds a new job depends on
how it polls. Each configuration gets a fresh migrated database behind a real PgBouncer in transaction mode
(tests/support/pgbouncer.py, pool of 10) and a "container" of --processes brokers with --threads worker
threads each (in this process: an idle worker's pickup is set by its polling, not by the CPU). Then:

1. idle cost: nothing is queued for --idle-s seconds; PgBouncer's SHOW STATS counts the queries the
   container sends meanwhile (claims, the lease keeper's rescue), per second;
2. idle pickup: --pickups times, the container is left idle (for longer than the adaptive policy's busy
   window, so it has backed off), then one row is inserted as the Edge Function does; the pickup is the row's
   `started_at - created_at`, both read from the database's clock.

Configurations: `today-<ms>` is the code before issue 12 (DATABASE_POLL_ONLY=true, only the consumer's own
poll every <ms>, no doorbell); `ring-<ms>` is the polling doorbell at a fixed interval (jitter 20 %);
`adaptive` is the default (broker/polling.py). The Markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: the repository root holds the `bench` package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dramatiq
import psycopg
from psycopg import sql

from bench.environment import DEFAULT_ADMIN_URL
from broker.broker import SupabaseBroker
from broker.defaults import DEFAULT_POLL_INTERVAL_MS
from broker.polling import BUSY_WINDOW_MS, IDLE_RING_MS, PollPolicy
from broker.postgres import PostgresTransport
from broker.transport import Doorbell, PresenceListener, WorkerInfo
from service.budget import worker_pool_size
from service.migrate import apply_migrations

DEFAULT_CONFIGS = (
    "today-10000",
    "today-1000",
    "ring-250",
    "ring-500",
    "ring-1000",
    "ring-2000",
    "adaptive",
)
#: The queue and actor of the benchmark's rows.
QUEUE_NAME = "default"
ACTOR_NAME = "bench_pickup_noop"
#: Milliseconds a worker thread waits on an empty work queue before checking whether it should stop.
WORKER_TIMEOUT_MS = 100
#: Seconds to wait for one row to be picked up before the round fails.
PICKUP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Result:
    config: str
    idle_qps: float
    pickups_s: list[float]

    def row(self) -> str:
        ordered = sorted(self.pickups_s)
        p50 = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
        return (
            f"| `{self.config}` | {p50:.2f} | {p90:.2f} | {max(ordered):.2f} | {self.idle_qps:.2f} |"
            f" {len(ordered)} |"
        )


class NoDoorbell(PostgresTransport):
    """The transport as it was before issue 12 in poll-only mode: no doorbell at all."""

    def doorbell(
        self, worker: WorkerInfo | None = None, presence: PresenceListener | None = None
    ) -> Doorbell | None:
        return None


def say(message: str) -> None:
    print(f"[poll_pickup] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pickups", type=int, default=12, help="idle pickups per configuration")
    parser.add_argument("--idle-s", type=float, default=15.0, help="seconds of idle cost measurement")
    parser.add_argument("--processes", type=int, default=2, help="worker processes of the container")
    parser.add_argument("--threads", type=int, default=4, help="worker threads per process")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    parser.add_argument("--database-url", default=DEFAULT_ADMIN_URL, help="superuser URL")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    return args


def build_container(
    config: str, url: str, processes: int, threads: int
) -> list[tuple[SupabaseBroker, dramatiq.Worker]]:
    made = []
    for _ in range(processes):
        poll_ms = DEFAULT_POLL_INTERVAL_MS
        if config.startswith("today-"):
            poll_ms = int(config.split("-", 1)[1])
            pool_size = worker_pool_size(threads)
            transport: PostgresTransport = NoDoorbell(url, pool_size=pool_size, poll_only=True)
        elif config.startswith("ring-"):
            ring_ms = int(config.split("-", 1)[1])
            policy = PollPolicy(busy_ms=ring_ms, idle_ms=ring_ms)
            transport = PostgresTransport(url, pool_size=worker_pool_size(threads), poll_policy=policy)
        elif config == "adaptive":
            transport = PostgresTransport(url, pool_size=worker_pool_size(threads))
        else:
            raise SystemExit(f"unknown configuration {config!r}")
        broker = SupabaseBroker(transport, poll_interval_ms=poll_ms, claim_ahead=0)
        dramatiq.actor(broker=broker, actor_name=ACTOR_NAME, queue_name=QUEUE_NAME, max_retries=0)(noop)
        worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=WORKER_TIMEOUT_MS)
        made.append((broker, worker))
    return made


def period_s(config: str) -> float:
    """The configuration's idle polling period, in seconds."""
    if config == "adaptive":
        return IDLE_RING_MS / 1000
    return int(config.split("-", 1)[1]) / 1000


def noop() -> None:
    """Does nothing: what is measured is how soon it starts."""


def queries(bouncer: Any, database: str) -> int:
    return sum(int(row["total_query_count"]) for row in bouncer.show("stats") if row["database"] == database)


def insert_row(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute(
        "insert into public.coding_jobs (actor_name, queue_name, kwargs) values (%s, %s, '{}')"
        " returning id::text",
        (ACTOR_NAME, QUEUE_NAME),
    ).fetchone()
    assert row is not None
    return str(row[0])


def pickup_s(conn: psycopg.Connection[Any], job_id: str) -> float:
    deadline = time.monotonic() + PICKUP_TIMEOUT_S
    while time.monotonic() < deadline:
        row = conn.execute(
            "select extract(epoch from started_at - created_at) from public.coding_jobs"
            " where id = %s and started_at is not null",
            (job_id,),
        ).fetchone()
        if row is not None:
            return float(row[0])
        time.sleep(0.01)
    raise RuntimeError(f"job {job_id} was not picked up within {PICKUP_TIMEOUT_S:g} s")


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    name = f"bench_pickup_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = name
    url = psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items() if v is not None})
    try:
        apply_migrations(url, bootstrap=True)
        yield name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def url_for(admin_url: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    user, host, port = info.get("user") or "postgres", info.get("host"), info.get("port") or 5432
    return f"postgresql://{user}@{host}:{port}/{name}"


def run_config(config: str, args: argparse.Namespace, rng: random.Random) -> Result:
    from tests.support.pgbouncer import TRANSACTION, running_pgbouncer

    with (
        fresh_database(args.database_url) as name,
        running_pgbouncer(args.database_url, mode=TRANSACTION) as bouncer,
    ):
        direct_url = url_for(args.database_url, name)
        container = build_container(config, bouncer.url(direct_url), args.processes, args.threads)
        with psycopg.connect(direct_url, autocommit=True) as conn:
            for _, worker in container:
                worker.start()
            try:
                # Idle cost: whatever the container sends while nothing is queued
                time.sleep(min(BUSY_WINDOW_MS / 1000 + 2, args.idle_s))
                before = queries(bouncer, name)
                started = time.monotonic()
                time.sleep(args.idle_s)
                idle_qps = (queries(bouncer, name) - before) / (time.monotonic() - started)
                say(f"{config}: {idle_qps:.2f} queries/s idle")

                pickups: list[float] = []
                for n in range(args.pickups):
                    # Idle past the adaptive policy's busy window (and its backing off), then a random phase
                    # of the configuration's polling period
                    time.sleep(BUSY_WINDOW_MS / 1000 + 2 + rng.uniform(0, period_s(config)))
                    pickups.append(pickup_s(conn, insert_row(conn)))
                    say(f"{config}: pickup {n + 1}/{args.pickups}: {pickups[-1]:.3f} s")
            finally:
                for broker, worker in container:
                    worker.stop(timeout=10_000)
                    broker.close()
        return Result(config, idle_qps, pickups)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the PgBouncer and the scratch database go away with the benchmark.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rng = random.Random(args.seed)
    results = [run_config(config, args, rng) for config in args.configs]
    print(
        f"Behind PgBouncer 1.18 in transaction mode (pool 10), one container of {args.processes} process(es)"
        f" x {args.threads} threads, {args.pickups} pickups after >= {BUSY_WINDOW_MS / 1000 + 2:g} s idle"
        " each:\n"
    )
    print("| configuration | idle pickup p50 (s) | p90 (s) | max (s) | idle queries/s | pickups |")
    print("|---|---:|---:|---:|---:|---:|")
    for result in results:
        print(result.row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
