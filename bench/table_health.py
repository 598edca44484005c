"""The queue table under a sustained load on top of a month of history: dead tuples, index sizes, claim cost.

Usage: .venv/bin/python -m bench.table_health [--history-rows 1000000] [--seconds 180] [--rate 800]

Autovacuum is what keeps a queue table flat, and the shared test server runs without it, so this starts a
PostgreSQL of its own (the embedded one, `pip install -e '.[embedded]'`) with autovacuum at PostgreSQL's
defaults, as a Supabase project has them. Two databases, both with the history: one with the queue table's
autovacuum settings from the migrations (20261202000400_performance.sql), one with them reset to the
server's defaults. Both get the same load at the same time: a producer enqueuing `--rate` no-op jobs a second
in batches, and a `dramatiq` worker in the service's default configuration processing them. Every
SAMPLE_EVERY_S the harness reads the table's statistics and sizes and times the claim's index scan (in a
transaction it rolls back). The Markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.environment import CLAIM_AHEAD_ENV, DATABASE_URL_ENV, DEFAULT_THREADS
from bench.noop_actors import QUEUE_NAME, declare_actor
from bench.pickup import running_worker
from bench.targets import HISTORY_SQL, BenchError
from broker.broker import SupabaseBroker
from broker.postgres import PostgresTransport

#: Seconds between two samples of the table's state.
SAMPLE_EVERY_S = 5.0
#: Seconds between two producer batches.
BATCH_EVERY_S = 0.1
#: The storage parameters the migration sets on coding_jobs; the untuned database resets them.
AUTOVACUUM_PARAMETERS = (
    "autovacuum_vacuum_scale_factor",
    "autovacuum_vacuum_threshold",
    "autovacuum_vacuum_insert_scale_factor",
    "autovacuum_vacuum_insert_threshold",
    "autovacuum_analyze_scale_factor",
    "autovacuum_analyze_threshold",
    "autovacuum_vacuum_cost_delay",
)
#: The claim's own index scan (claim_jobs' first CTE), timed by EXPLAIN ANALYZE and rolled back.
CLAIM_SCAN_SQL = f"""
explain (analyze, timing off)
select j.id from public.coding_jobs j
 where j.status = 'pending' and j.queue_name = '{QUEUE_NAME}' and j.run_at <= now()
 order by j.priority desc, j.created_at limit 16 for update skip locked
"""
STATE_SQL = """
select n_live_tup, n_dead_tup, autovacuum_count, autoanalyze_count,
       pg_relation_size('public.coding_jobs'),
       (select coalesce(sum(pg_relation_size(i.indexrelid)), 0) from pg_index i
         where i.indrelid = 'public.coding_jobs'::regclass),
       (select json_object_agg(c.relname, pg_relation_size(c.oid)) from pg_index i join pg_class c
         on c.oid = i.indexrelid where i.indrelid = 'public.coding_jobs'::regclass),
       (select count(*) from public.coding_jobs where status = 'pending')
  from pg_stat_user_tables where relid = 'public.coding_jobs'::regclass
"""


def sample(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The table's statistics and sizes now, and one timed claim scan."""
    conn.execute("select pg_stat_clear_snapshot()")
    row = conn.execute(STATE_SQL).fetchone()
    assert row is not None
    live, dead, vacuums, analyzes, heap, indexes, per_index, pending = row
    with conn.transaction(force_rollback=True):
        plan = "\n".join(r[0] for r in conn.execute(CLAIM_SCAN_SQL).fetchall())
    claim_ms = float(plan.rsplit("Execution Time:", 1)[1].split()[0])
    return {
        "at": time.monotonic(),
        "live": live,
        "dead": dead,
        "autovacuums": vacuums,
        "autoanalyzes": analyzes,
        "heap_bytes": heap,
        "index_bytes": indexes,
        "per_index": per_index,
        "pending": pending,
        "claim_scan_ms": claim_ms,
    }


class Producer(threading.Thread):
    """Enqueues `rate` no-op jobs a second, in a batch every BATCH_EVERY_S, until stopped."""

    def __init__(self, url: str, rate: int) -> None:
        super().__init__(daemon=True)
        self.broker = SupabaseBroker(PostgresTransport(url, pool_size=1))
        self.actor = declare_actor(self.broker)
        self.rate = rate
        self.sent = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        per_batch = max(1, round(self.rate * BATCH_EVERY_S))
        started = time.monotonic()
        while not self.stopping.is_set():
            due = int((time.monotonic() - started) * self.rate)
            if self.sent < due:
                self.broker.enqueue_many(
                    [self.actor.message() for _ in range(min(per_batch, due - self.sent))]
                )
                self.sent += min(per_batch, due - self.sent)
            self.stopping.wait(BATCH_EVERY_S / 2)
        self.broker.close()


@contextlib.contextmanager
def private_server(work: Path) -> Iterator[str]:
    """An embedded PostgreSQL with autovacuum at its defaults; its admin URL. Stopped on the way out."""
    from service.embedded_db import start_embedded_postgres, stop_embedded_postgres

    data_dir = work / "postgres"
    server = start_embedded_postgres(data_dir)
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            row = conn.execute("show autovacuum").fetchone()
        if row is None or row[0] != "on":
            raise BenchError("the embedded server runs without autovacuum")
        yield server.url
    finally:
        stop_embedded_postgres(data_dir)


def make_database(admin_url: str, name: str, history_rows: int, *, tuned: bool) -> str:
    from service.migrate import apply_migrations

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = name
    url = psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items() if v is not None})
    apply_migrations(url, bootstrap=True)
    with psycopg.connect(url, autocommit=True) as conn:
        if not tuned:
            reset = sql.SQL("alter table public.coding_jobs reset ({})").format(
                sql.SQL(", ").join(sql.Identifier(p) for p in AUTOVACUUM_PARAMETERS)
            )
            conn.execute(reset)
        conn.execute(HISTORY_SQL, (history_rows, history_rows))
        conn.execute("vacuum analyze public.coding_jobs")
    return url


def run(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    samples: dict[str, list[dict[str, Any]]] = {"tuned": [], "defaults": []}
    with tempfile.TemporaryDirectory(prefix="bench-table-health-") as tmp, private_server(Path(tmp)) as admin:
        urls = {}
        for name in samples:
            _say(f"{name}: migrating and writing {args.history_rows:,} rows of history ...")
            urls[name] = make_database(admin, f"health_{name}", args.history_rows, tuned=name == "tuned")
        probes = {name: psycopg.connect(url, autocommit=True) for name, url in urls.items()}
        producers = {name: Producer(url, args.rate) for name, url in urls.items()}
        with contextlib.ExitStack() as stack:
            for name, url in urls.items():
                env = {DATABASE_URL_ENV: url, CLAIM_AHEAD_ENV: "0"}
                stack.enter_context(
                    running_worker("bench.supabase_worker", env, args.threads, Path(tmp) / f"{name}.log")
                )
            for name, conn in probes.items():
                samples[name].append(sample(conn))
            for producer in producers.values():
                producer.start()
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                time.sleep(SAMPLE_EVERY_S)
                for name, conn in probes.items():
                    samples[name].append(sample(conn))
                    last = samples[name][-1]
                    _say(
                        f"{name}: {producers[name].sent:,} sent, {last['pending']:,} pending, "
                        f"{last['dead']:,} dead tuples, indexes {last['index_bytes'] / 2**20:.1f} MB, "
                        f"claim scan {last['claim_scan_ms']:.3f} ms, autovacuums {last['autovacuums']}"
                    )
            for producer in producers.values():
                producer.stopping.set()
                producer.join()
        for conn in probes.values():
            conn.close()
    return samples


def render_markdown(samples: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [
        f"Queue table health: {args.history_rows:,} rows of history, {args.rate:,} jobs/s offered for "
        f"{args.seconds:g} s to one worker ({args.threads} threads, CLAIM_AHEAD_JOBS=0) per database, both "
        f"databases at once on a private PostgreSQL with autovacuum at its defaults; sampled every "
        f"{SAMPLE_EVERY_S:g} s.",
        "",
        "| queue table settings | dead tuples, max / end | autovacuums | table MB, start -> end "
        "| indexes MB, start -> end | claim scan ms, first 3 samples / last 3 (median) | pending at end |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    titles = {"tuned": "from the migrations (20261202000400)", "defaults": "server defaults"}
    for name, rows in samples.items():
        first, last = rows[0], rows[-1]
        early = statistics.median(r["claim_scan_ms"] for r in rows[1:4])
        late = statistics.median(r["claim_scan_ms"] for r in rows[-3:])
        lines.append(
            f"| {titles[name]} | {max(r['dead'] for r in rows):,} / {last['dead']:,} "
            f"| {last['autovacuums'] - first['autovacuums']} "
            f"| {first['heap_bytes'] / 2**20:,.0f} -> {last['heap_bytes'] / 2**20:,.0f} "
            f"| {first['index_bytes'] / 2**20:,.1f} -> {last['index_bytes'] / 2**20:,.1f} "
            f"| {early:.3f} / {late:.3f} | {last['pending']:,} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.table_health", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--history-rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--rate", type=int, default=800, help="jobs/s offered to each database (800)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    return parser.parse_args(argv)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        samples = run(args)
    except BenchError as exc:
        _say(f"benchmark failed: {exc}")
        return 1
    print(render_markdown(samples, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
