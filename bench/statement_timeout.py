"""What bounding each queue call with its own statement timeout costs, per call, against the ways before it.

Usage: .venv/bin/python bench/statement_timeout.py [--calls 3000] [--rounds 5] [--database-url URL]

One client, one connection, `claim_jobs` on an empty queue (the call an idle worker makes most), directly and
through a real PgBouncer in transaction mode (tests/support/pgbouncer.py). Ways, rounds interleaved, the table
gives the median microseconds per call:

- `prepared`: before issue 12 on a direct connection: extended protocol, psycopg prepares the query on its
  fifth run; bounded only by a role setting (through a transaction pooler it fails: prepared statements);
- `unprepared`: the same without prepared statements (before issue 12 with DATABASE_POLL_ONLY);
- `set local, simple`: now: `set local statement_timeout = N; <call>` as one simple-protocol query, parameters
  bound by psycopg (broker/function_pool.py);
- `set local, pipeline`: the other way to keep it in one round trip: BEGIN, SET LOCAL, the call and COMMIT in
  a psycopg pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: the repository root holds the `bench` package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg import ClientCursor, sql

from bench.environment import DEFAULT_ADMIN_URL
from service.migrate import apply_migrations

CALL = "select * from public.claim_jobs(%s, %s, %s, %s)"
ARGS = ("bench-worker", "default", 4, 60_000)
#: Milliseconds of the statement timeout the bounded ways set.
TIMEOUT_MS = 5_000
#: Calls before each timed run, so every way is warm (and `prepared` is prepared).
WARM_UP_CALLS = 200

Call = Callable[[psycopg.Connection[Any]], None]


def plain(conn: psycopg.Connection[Any]) -> None:
    conn.execute(CALL, ARGS).fetchall()


def set_local_simple(conn: psycopg.Connection[Any]) -> None:
    with ClientCursor(conn) as cur:
        cur.execute(f"set local statement_timeout = {TIMEOUT_MS}; {CALL}", ARGS)
        cur.nextset()
        cur.fetchall()


def set_local_pipeline(conn: psycopg.Connection[Any]) -> None:
    with conn.pipeline(), conn.transaction():
        conn.execute(f"set local statement_timeout = {TIMEOUT_MS}")
        cur = conn.execute(CALL, ARGS)
    cur.fetchall()


#: name -> (call, psycopg prepare_threshold, works through a transaction pooler)
WAYS: dict[str, tuple[Call, int | None, bool]] = {
    "prepared (before)": (plain, 5, False),
    "unprepared (before, DATABASE_POLL_ONLY)": (plain, None, True),
    "set local, simple protocol (now)": (set_local_simple, None, True),
    "set local, pipeline": (set_local_pipeline, None, True),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3_000, help="timed calls per way and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database-url", default=DEFAULT_ADMIN_URL, help="superuser URL")
    return parser.parse_args(argv)


@contextlib.contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    name = f"bench_timeout_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    user, host, port = info.get("user") or "postgres", info.get("host"), info.get("port") or 5432
    url = f"postgresql://{user}@{host}:{port}/{name}"
    try:
        apply_migrations(url, bootstrap=True)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def time_way(url: str, call: Call, prepare_threshold: int | None, calls: int) -> float:
    """Microseconds per call."""
    with psycopg.connect(url, autocommit=True, prepare_threshold=prepare_threshold) as conn:
        for _ in range(WARM_UP_CALLS):
            call(conn)
        started = time.perf_counter()
        for _ in range(calls):
            call(conn)
        return (time.perf_counter() - started) / calls * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the PgBouncer and the scratch database go away with the benchmark.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from tests.support.pgbouncer import TRANSACTION, running_pgbouncer

    timings: dict[tuple[str, str], list[float]] = {}
    with (
        scratch_database(args.database_url) as url,
        running_pgbouncer(args.database_url, mode=TRANSACTION) as bouncer,
    ):
        targets = {"direct": url, "PgBouncer, transaction mode": bouncer.url(url)}
        for round_no in range(args.rounds):
            for target, target_url in targets.items():
                for name, (call, threshold, pooled) in WAYS.items():
                    if target != "direct" and not pooled:
                        continue
                    us = time_way(target_url, call, threshold, args.calls)
                    timings.setdefault((name, target), []).append(us)
            print(f"[statement_timeout] round {round_no + 1}/{args.rounds} done", file=sys.stderr)

    rounds = args.rounds
    print(f"Microseconds per `claim_jobs` call on an empty queue, one client; median of {rounds} rounds:\n")
    print("| way | " + " | ".join(targets) + " |")
    print("|---|" + "---:|" * len(targets))
    for name in WAYS:
        cells = []
        for target in targets:
            found = timings.get((name, target))
            cells.append(f"{statistics.median(found):.0f}" if found else "fails")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
