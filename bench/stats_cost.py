"""What the queue's statistics cost as the history grows: 1,000 rows against 1,000,000 (issue 8).

Usage: .venv/bin/python bench/stats_cost.py [--sizes 1000,1000000] [--repeats 30] [--json]

For each size, a scratch database is migrated and filled with generate_series: finished jobs of two queues and
three actors spread over the last week (most completed, some failed and cancelled), plus the same few hundred
pending and running ones at every size. Then, through the direct transport, it times each read the health
server makes for /metrics and the monitor (get_queue_stats, get_actor_stats, get_queue_consumers,
get_paused_queues), the dashboard's main-page read, the CLI's list of the newest completed jobs (through the
BRIN index on completed_at, a look-back window at a time), and, for comparison, the full-scan GROUP BY that
get_queue_stats() was before. Medians and 95th percentiles in milliseconds; the table goes to
stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg import sql

from bench.environment import DEFAULT_ADMIN_URL
from broker.operator_records import JobFilter
from broker.postgres import PostgresTransport
from health.dashboard.board import read_board
from service.migrate import apply_migrations

#: Active jobs at every size: what the partial indexes read (they do not grow with the history).
PENDING, RUNNING = 300, 20
#: The query get_queue_stats() ran before the counts (a scan of every row), for comparison.
FULL_SCAN = """
select j.queue_name, j.status, count(*), min(j.created_at), min(j.run_at)
  from public.coding_jobs j group by j.queue_name, j.status"""
FILL = """
insert into public.coding_jobs (queue_name, actor_name, prompt, kwargs, status, created_at, run_at,
                                started_at, completed_at, locked_by, error_message)
select case when mod(g, 4) = 0 then 'mail' else 'default' end,
       (array['run_coding_job', 'send_mail', 'render'])[1 + mod(g, 3)],
       'prompt ' || g, '{}'::jsonb,
       (case when mod(g, 50) = 0 then 'failed' when mod(g, 97) = 0 then 'cancelled'
             else 'completed' end)::public.job_status,
       now() - mod(g, 604800) * interval '1 second',
       now() - mod(g, 604800) * interval '1 second',
       now() - mod(g, 604800) * interval '1 second' + interval '1 second',
       now() - mod(g, 604800) * interval '1 second' + interval '3 seconds',
       'bench-worker',
       case when mod(g, 50) = 0 then 'RuntimeError: failed in the benchmark' end
  from generate_series(1, %s) g"""


def timed(call: Callable[[], Any], repeats: int) -> dict[str, float]:
    call()  # warm: the plan cache and the pool's connection
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 3),
        "p95_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.95))], 3),
    }


def build(admin_url: str, rows: int) -> str:
    name = f"bench_stats_{rows}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = name
    url = psycopg.conninfo.make_conninfo("", **{k: str(v) for k, v in info.items() if v is not None})
    apply_migrations(url, bootstrap=True)
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(FILL, (rows,))
        conn.execute(
            "insert into public.coding_jobs (prompt, created_at) "
            "select 'waiting ' || g, now() - g * interval '1 second' from generate_series(1, %s) g",
            (PENDING,),
        )
        conn.execute(
            "select public.register_worker('bench-worker', 'heartbeat', 600000, 'h', 1, '{default}')"
        )
        conn.execute(
            "select count(*) from public.claim_jobs('bench-worker', 'default', %s, 600000, %s::uuid)",
            (RUNNING, str(uuid.uuid4())),
        )
        conn.execute("select public.queue_compact_stats()")
        conn.execute("vacuum analyze public.coding_jobs")
    print(f"{rows:,} rows: built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return url


def drop(admin_url: str, url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(str(name))))


def measure(url: str, repeats: int) -> dict[str, dict[str, float]]:
    transport = PostgresTransport(url, pool_size=2)
    try:
        results = {
            "get_queue_stats()": timed(transport.stats, repeats),
            "get_actor_stats()": timed(transport.actor_stats, repeats),
            "get_queue_consumers()": timed(transport.consumers, repeats),
            "get_paused_queues()": timed(transport.paused_queues, repeats),
        }
        results["/metrics and monitor read (all four)"] = timed(
            lambda: (
                transport.stats(),
                transport.actor_stats(),
                transport.consumers(),
                transport.paused_queues(),
            ),
            repeats,
        )
        few = max(repeats // 3, 3)
        results["dashboard main page read"] = timed(lambda: read_board(transport), few)
        newest = JobFilter(status="completed")
        results["CLI: newest 50 completed jobs"] = timed(lambda: transport.list_jobs(newest, limit=50), few)
        with psycopg.connect(url, autocommit=True) as conn:
            results["before: full-scan GROUP BY"] = timed(lambda: conn.execute(FULL_SCAN).fetchall(), few)
        return results
    finally:
        transport.close()


def render(sizes: Sequence[int], results: dict[int, dict[str, dict[str, float]]]) -> str:
    head = "| Read | " + " | ".join(f"{size:,} rows: median / p95 (ms)" for size in sizes) + " |"
    lines = [head, "|---|" + "---:|" * len(sizes)]
    for name in results[sizes[0]]:
        cells = " | ".join(
            f"{results[s][name]['median_ms']:.2f} / {results[s][name]['p95_ms']:.2f}" for s in sizes
        )
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,1000000", help="rows of history, comma-separated")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--database-url", default=DEFAULT_ADMIN_URL, help="superuser URL; scratch databases go there"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    results: dict[int, dict[str, dict[str, float]]] = {}
    for size in sizes:
        url = build(args.database_url, size)
        try:
            results[size] = measure(url, args.repeats)
        finally:
            drop(args.database_url, url)
    if args.json:
        print(json.dumps({str(size): found for size, found in results.items()}, indent=2))
    else:
        print(render(sizes, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
