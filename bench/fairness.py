"""Fair share (issue 11): claim throughput with caps and fair share on versus off, the longest wait of a Free
job under a sustained Pro backlog, and cap overshoot under 4 worker processes x 8 threads.

Usage: .venv/bin/python -m bench.fairness [--jobs 8000] [--rounds 3] [--seconds 15] [--json]

1. Throughput: 8 claimer threads, each on its own connection and registered as a worker, claim batches of 16
   and complete them at once (claim_jobs, complete_jobs: the SQL a worker runs, without Dramatiq around it, so
   the ratio is the claim's own cost). The jobs belong to 200 users over the three plans (with the default
   caps they rarely bind, so both modes can run every job) and a fifth have no user. Rounds alternate between
   fair share on and off (set_fairness), each on a fresh database cloned from one migrated template.
2. Free wait: 8 threads claim one job at a time and hold it 20 ms; a producer keeps 300 Pro jobs of 40 users
   pending; a new Free user's job arrives every 0.5 s. Each Free job's wait is started_at - created_at (the
   database's clock). The bound is ten aging steps (`--aging-step-ms`, default 200 ms: 2 s) plus the time a
   slot takes to free. The same run with aging made negligible shows what it prevents.
3. Overshoot: 4 processes x 8 threads claim 1-4 jobs and hold each 1-10 ms; 30 users over the three plans.
   Each job's hold is recorded with the system-wide monotonic clock between the claim's commit and the
   completion's start, so it lies inside the job's running time; the most jobs of one user held at once,
   minus the cap, is the overshoot. A sampler also counts running jobs per user in single snapshots.
The Markdown report goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from bench.environment import DEFAULT_ADMIN_URL
from service.migrate import apply_migrations

FREE, STARTER, PRO = 0, 5, 10
CAPS = {FREE: 1, STARTER: 2, PRO: 5}
CLAIM_BATCH = 16
CLAIMERS = 8
#: Pro jobs the wait run keeps pending (more than its workers run in half a second).
PRO_BACKLOG = 1000
USERS = 200


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Databases:
    """A migrated template and fresh clones of it on one server; all dropped on close."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.prefix = f"bench_fairness_{uuid.uuid4().hex[:6]}"
        self.names: list[str] = []
        self.template = self._create(f"{self.prefix}_template")
        apply_migrations(self.url(self.template), bootstrap=True)

    def url(self, name: str) -> str:
        return psycopg.conninfo.make_conninfo(self.admin_url, dbname=name)

    def clone(self, label: str) -> str:
        return self.url(self._create(f"{self.prefix}_{label}", template=self.template))

    def _create(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            query = sql.SQL("create database {}").format(sql.Identifier(name))
            if template:
                query = sql.SQL("{} template {}").format(query, sql.Identifier(template))
            conn.execute(query)
        self.names.append(name)
        return name

    def close(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name in reversed(self.names):
                conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def connect(url: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def claim(conn: psycopg.Connection[dict[str, Any]], worker: str, limit: int) -> list[dict[str, Any]]:
    return conn.execute(
        "select id, claim_token, user_id from public.claim_jobs(%s, 'default', %s, 60000, %s)",
        (worker, limit, uuid.uuid4()),
        prepare=True,
    ).fetchall()


def complete(conn: psycopg.Connection[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    conn.execute(
        "select public.complete_jobs(%s::uuid[], %s::uuid[])",
        ([r["id"] for r in rows], [r["claim_token"] for r in rows]),
        prepare=True,
    )


def register(conn: psycopg.Connection[dict[str, Any]], worker: str) -> None:
    conn.execute("select public.register_worker(%s, 'heartbeat', 600000)", (worker,))


# -- 1. throughput -------------------------------------------------------------------------------------------
def throughput_round(url: str, jobs: int, fair: bool) -> tuple[float, float]:
    """Jobs per second, and jobs per claim call."""
    with connect(url) as conn:
        conn.execute("select public.set_fairness(%s)", (fair,))
        conn.execute(
            "insert into public.coding_jobs (user_id, prompt, priority)"
            " select case when n %% 5 = 0 then null"
            "        else ('00000000-0000-4000-8000-' || lpad((n %% %s)::text, 12, '0'))::uuid end,"
            "        'p', (array[0, 5, 10])[1 + n %% 3]"
            "   from generate_series(1, %s) n",
            (USERS, jobs),
        )
        conn.execute("vacuum analyze public.coding_jobs")
    done = [0] * CLAIMERS
    calls = [0] * CLAIMERS
    start = threading.Barrier(CLAIMERS + 1)

    def claimer(n: int) -> None:
        with connect(url) as conn:
            register(conn, f"bench-{n}")
            start.wait()
            empty = 0
            while empty < 3:
                rows = claim(conn, f"bench-{n}", CLAIM_BATCH)
                calls[n] += 1
                if rows:
                    complete(conn, rows)
                    done[n] += len(rows)
                    empty = 0
                else:
                    empty += 1
                    time.sleep(0.005)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(CLAIMERS)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    with connect(url) as conn:
        left = conn.execute(
            "select count(*) as n from public.coding_jobs where status <> 'completed'"
        ).fetchone()
    if sum(done) != jobs or (left and left["n"]):
        raise SystemExit(f"throughput round lost jobs: {sum(done)} of {jobs} completed, {left} left")
    return jobs / elapsed, jobs / sum(calls)


# -- 2. Free wait under a sustained Pro backlog ------------------------------------------------------------
def free_wait(url: str, seconds: float, aging_step_ms: int) -> dict[str, Any]:
    with connect(url) as conn:
        conn.execute("select public.set_fairness(true, %s)", (aging_step_ms,))
    stop = threading.Event()
    pro_users = [uuid.uuid4() for _ in range(40)]
    free_jobs: list[str] = []

    backlog: list[int] = []

    def producer() -> None:
        with connect(url) as conn:
            while not stop.is_set():
                pending = conn.execute(
                    "select count(*) as n from public.coding_jobs where status = 'pending' and priority = 10"
                ).fetchone()
                backlog.append(int(pending["n"] if pending else 0))
                missing = PRO_BACKLOG - backlog[-1]
                if missing > 0:
                    conn.execute(
                        "insert into public.coding_jobs (user_id, prompt, priority)"
                        " select (%s::uuid[])[1 + n %% %s], 'pro', 10 from generate_series(1, %s) n",
                        (pro_users, len(pro_users), missing),
                    )
                if backlog[-1] > 0 and len(free_jobs) < seconds * 2:  # one Free job every 0.5 s
                    row = conn.execute(
                        "insert into public.coding_jobs (user_id, prompt, priority)"
                        " values (gen_random_uuid(), 'free', 0) returning id::text as id"
                    ).fetchone()
                    assert row is not None
                    free_jobs.append(row["id"])
                stop.wait(0.5)

    def worker(n: int) -> None:
        with connect(url) as conn:
            register(conn, f"wait-{n}")
            while not stop.is_set():
                rows = claim(conn, f"wait-{n}", 1)
                if rows:
                    time.sleep(0.02)
                    complete(conn, rows)
                else:
                    time.sleep(0.01)

    threads = [threading.Thread(target=producer)] + [
        threading.Thread(target=worker, args=(n,)) for n in range(CLAIMERS)
    ]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    with connect(url) as conn:
        rows = conn.execute(
            "select extract(epoch from coalesce(started_at, now()) - created_at) as wait_s,"
            " started_at is not null as started"
            " from public.coding_jobs where id = any(%s::uuid[])",
            (free_jobs,),
        ).fetchall()
        pro = conn.execute(
            "select max(extract(epoch from started_at - created_at)) as wait_s from public.coding_jobs"
            " where priority = 10 and started_at is not null"
        ).fetchone()
    started = [float(r["wait_s"]) for r in rows if r["started"]]
    return {
        "aging_step_ms": aging_step_ms,
        "bound_s": 10 * aging_step_ms / 1000,
        "free_jobs": len(rows),
        "free_started": len(started),
        "free_max_wait_s": max(started) if started else None,
        "free_median_wait_s": statistics.median(started) if started else None,
        "free_never_started_waited_s": max(
            (float(r["wait_s"]) for r in rows if not r["started"]), default=None
        ),
        "pro_max_wait_s": float(pro["wait_s"]) if pro and pro["wait_s"] is not None else None,
        # the Pro backlog at each of the producer's looks after the first: never empty means sustained
        "pro_backlog_min": min(backlog[1:], default=0),
    }


# -- 3. overshoot -------------------------------------------------------------------------------------------
def overshoot_process(url: str, index: int, seconds: float, results: Any) -> None:
    spans: list[tuple[str, float, float]] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def thread(n: int) -> None:
        worker = f"over-{index}-{n}"
        with connect(url) as conn:
            register(conn, worker)
            while time.monotonic() < stop:
                rows = claim(conn, worker, random.randint(1, 4))
                held = time.monotonic()
                time.sleep(random.uniform(0.001, 0.01))
                released = time.monotonic()
                with lock:
                    spans.extend((str(r["user_id"]), held, released) for r in rows if r["user_id"])
                if rows:
                    complete(conn, rows)

    threads = [threading.Thread(target=thread, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(spans)


def overshoot(url: str, seconds: float) -> dict[str, Any]:
    users = {str(uuid.uuid4()): (FREE, STARTER, PRO)[n % 3] for n in range(30)}
    with connect(url) as conn:
        conn.execute("select public.set_fairness(true)")
        for user, priority in users.items():
            conn.execute(
                "insert into public.coding_jobs (user_id, prompt, priority)"
                " select %s, 'p', %s from generate_series(1, 2000)",
                (user, priority),
            )
    sampled: dict[str, int] = defaultdict(int)
    stop = threading.Event()

    def sampler() -> None:
        with connect(url) as conn:
            while not stop.is_set():
                for row in conn.execute(
                    "select user_id::text as u, count(*) as n from public.coding_jobs"
                    " where status = 'processing' and user_id is not null group by 1"
                ):
                    sampled[row["u"]] = max(sampled[row["u"]], int(row["n"]))

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=overshoot_process, args=(url, i, seconds, results)) for i in range(4)]
    watcher = threading.Thread(target=sampler)
    watcher.start()
    for process in processes:
        process.start()
    spans = [span for _ in processes for span in results.get(timeout=seconds + 120)]
    for process in processes:
        process.join(timeout=30)
    stop.set()
    watcher.join()
    by_user: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for user, held, released in spans:
        by_user[user].append((held, released))
    most = {user: max_overlap(s) for user, s in by_user.items()}
    over = max((most.get(u, 0) - CAPS[p] for u, p in users.items()), default=0)
    over_sampled = max((sampled.get(u, 0) - CAPS[p] for u, p in users.items()), default=0)
    reached = sum(most.get(u, 0) == CAPS[p] for u, p in users.items())
    return {
        "jobs_run": len(spans),
        "overshoot": max(over, 0),
        "overshoot_sampled": max(over_sampled, 0),
        "users_reaching_their_cap": f"{reached} of {len(users)}",
    }


def max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8000, help="jobs per throughput round (default 8000)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per mode (default 3)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the wait and overshoot runs")
    parser.add_argument("--aging-step-ms", type=int, default=200)
    parser.add_argument(
        "--database-url", default=DEFAULT_ADMIN_URL, help="superuser URL for scratch databases"
    )
    parser.add_argument("--parts", default="throughput,wait,overshoot", help="which measurements to run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    databases = Databases(args.database_url)
    report: dict[str, Any] = {
        "throughput": {"on": [], "off": [], "on_jobs_per_claim": [], "off_jobs_per_claim": []}
    }
    parts = set(args.parts.split(","))
    try:
        for round_no in range(1, args.rounds + 1 if "throughput" in parts else 1):
            for mode in ("on", "off") if round_no % 2 else ("off", "on"):
                url = databases.clone(f"tp_{mode}_{round_no}")
                rate, per_claim = throughput_round(url, args.jobs, mode == "on")
                report["throughput"][mode].append(rate)
                report["throughput"][f"{mode}_jobs_per_claim"].append(per_claim)
                say(f"round {round_no}, fair share {mode}: {rate:,.0f} jobs/s, {per_claim:.1f} per claim")
        if "wait" in parts:
            say("Free wait, with aging ...")
            report["free_wait"] = free_wait(databases.clone("wait"), args.seconds, args.aging_step_ms)
            say("Free wait, aging negligible ...")
            report["free_wait_no_aging"] = free_wait(databases.clone("wait_off"), args.seconds, 2_000_000_000)
        if "overshoot" in parts:
            say("Overshoot under 4 processes x 8 threads ...")
            report["overshoot"] = overshoot(databases.clone("over"), args.seconds)
    finally:
        databases.close()
    print(
        json.dumps(report, indent=2)
        if args.json or parts != {"throughput", "wait", "overshoot"}
        else render(report)
    )
    return 0


def render(report: dict[str, Any]) -> str:
    on, off = report["throughput"]["on"], report["throughput"]["off"]
    ratio = statistics.median(on) / statistics.median(off)
    wait, control, over = report["free_wait"], report["free_wait_no_aging"], report["overshoot"]
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| claim+complete jobs/s, fair share on (rounds) | {' / '.join(f'{r:,.0f}' for r in on)} |",
        f"| claim+complete jobs/s, fair share off (rounds) | {' / '.join(f'{r:,.0f}' for r in off)} |",
        f"| ratio on/off (medians) | {ratio:.2f} |",
        f"| jobs per claim call, on / off (medians) | "
        f"{statistics.median(report['throughput']['on_jobs_per_claim']):.1f} / "
        f"{statistics.median(report['throughput']['off_jobs_per_claim']):.1f} |",
        f"| Free jobs started / arrived (aging step {wait['aging_step_ms']} ms) | "
        f"{wait['free_started']} / {wait['free_jobs']} |",
        f"| max Free wait (bound: 10 steps = {wait['bound_s']:g} s) | {fmt(wait['free_max_wait_s'])} |",
        f"| median Free wait | {fmt(wait['free_median_wait_s'])} |",
        f"| max Pro wait in the same run (Pro backlog never below {wait['pro_backlog_min']}) | "
        f"{fmt(wait['pro_max_wait_s'])} |",
        f"| without aging: Free jobs started / arrived | "
        f"{control['free_started']} / {control['free_jobs']} (oldest waiting "
        f"{fmt(control['free_never_started_waited_s'])}) |",
        f"| cap overshoot, 4 processes x 8 threads ({over['jobs_run']:,} jobs) | {over['overshoot']} "
        f"(sampled: {over['overshoot_sampled']}; "
        f"users reaching their cap: {over['users_reaching_their_cap']}) |",
    ]
    return "\n".join(lines)


def fmt(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f} s"


if __name__ == "__main__":
    raise SystemExit(main())
