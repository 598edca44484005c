"""The whole comparison in one command and one table: enqueue, batch enqueue, processing and pickup.

Usage: .venv/bin/python -m bench.compare [--jobs 5000] [--rounds 3] [--threads 8] [--history-rows 1000000]

Rows: this broker with Dramatiq's prefetch and in the service's default configuration (CLAIM_AHEAD_JOBS=0,
threads = MAX_CONCURRENT_JOBS), the same on a table holding a month of history, the same with two worker
processes, Dramatiq + RabbitMQ, and the floor (bench/floor.py: one INSERT with pg_notify per job, a one-thread
hand-written worker). Every round measures every row, in a rotating order, so a noisy moment on a shared
machine slows them alike; the table gives medians over rounds. bench/README.md says what each column means.
The Markdown table goes to stdout, progress to stderr; --json prints every figure instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import enqueue
from bench.environment import (
    DATABASE_URL_ENV,
    DEFAULT_ADMIN_URL,
    DEFAULT_RABBITMQ_URL,
    DEFAULT_THREADS,
    PICKUP_PORT_ENV,
    RABBITMQ_URL_ENV,
)
from bench.floor import FloorProducer
from bench.pickup import Gaps, Pickups, StampListener, measure, running_worker
from bench.stamp import declare_stamp
from bench.targets import BenchError, RabbitmqTarget, SupabaseTarget, Target
from bench.worker_process import ROOT, run_worker
from broker.broker import SupabaseBroker
from broker.postgres import PostgresTransport


@dataclasses.dataclass
class System:
    """One row of the table: how to enqueue, process and pick up its jobs."""

    key: str
    label: str
    #: The throughput target (None: the floor, which has its own worker, or a row without a worker).
    target: Target | None
    processes: int = 1
    #: Whether the row has a worker to time (processing and pickup).
    worker: bool = True
    #: Producer-side measurements this row gets: "send", "batch".
    enqueues: tuple[str, ...] = ()
    figures: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    pickups: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.figures.setdefault(name, []).append(value)

    def median(self, name: str) -> float | None:
        values = self.figures.get(name)
        return statistics.median(values) if values else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5_000, help="no-op jobs per processing round (5000)")
    parser.add_argument("--send-jobs", type=int, default=3_000, help="send() calls per enqueue round (3000)")
    parser.add_argument("--batch-jobs", type=int, default=30_000, help="jobs per batch-enqueue round (30000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="threads per worker process (8)")
    parser.add_argument("--history-rows", type=int, default=1_000_000, help="rows of history (1000000)")
    parser.add_argument("--pickups", type=int, default=40, help="pickups after a short gap, per round (40)")
    parser.add_argument(
        "--idle-pickups", type=int, default=6, help="pickups after an idle gap, per round (6)"
    )
    parser.add_argument("--idle-gap", type=float, nargs=2, default=(2.5, 3.5), metavar=("MIN_S", "MAX_S"))
    parser.add_argument(
        "--database-url", default=DEFAULT_ADMIN_URL, help="superuser URL for scratch databases"
    )
    parser.add_argument("--rabbitmq-url", default=DEFAULT_RABBITMQ_URL)
    parser.add_argument("--skip", default="", help="comma-separated row keys to leave out")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--partial", type=Path, help="write the figures so far to this file after each round")
    args = parser.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


def build_systems(args: argparse.Namespace) -> list[System]:
    admin, pid = args.database_url, os.getpid()
    history = f"{args.history_rows:,}" if args.history_rows else "no"
    systems = [
        System(
            "prefetch",
            "this broker, Dramatiq prefetch (2 x threads)",
            SupabaseTarget(admin, f"bench_cmp_prefetch_{pid}"),
            enqueues=("send", "batch"),
        ),
        System(
            "default",
            "this broker, service default (CLAIM_AHEAD_JOBS=0)",
            SupabaseTarget(admin, f"bench_cmp_default_{pid}", claim_ahead=0),
        ),
        System(
            "history",
            f"this broker, service default, {history} rows of history",
            SupabaseTarget(admin, f"bench_cmp_history_{pid}", claim_ahead=0, history_rows=args.history_rows),
        ),
        System(
            "two",
            "this broker, service default, 2 processes",
            SupabaseTarget(admin, f"bench_cmp_two_{pid}", claim_ahead=0),
            processes=2,
        ),
        System("rest", "this broker over REST (test endpoint), service default, Realtime off", None),
        System("rabbitmq", "Dramatiq + RabbitMQ", RabbitmqTarget(args.rabbitmq_url), enqueues=("send",)),
        System(
            "floor",
            "floor: INSERT + pg_notify on a minimal table, hand-written worker",
            None,
            enqueues=("send",),
        ),
        System(
            "insert",
            "hand-written INSERT into coding_jobs (its trigger rings)",
            None,
            enqueues=("send",),
            worker=False,
        ),
    ]
    return [s for s in systems if s.key not in args.skip]


def run(args: argparse.Namespace) -> dict[str, Any]:
    systems = build_systems(args)
    floor_db = SupabaseTarget(args.database_url, f"bench_cmp_floor_{os.getpid()}")
    load_before = os.getloadavg()
    try:
        for system in systems:
            if system.target is not None:
                _say(f"setting up {system.key} ...")
                system.target.setup()
        floor_db.setup()
        with tempfile.TemporaryDirectory(prefix="bench-compare-") as work:
            for round_no in range(1, args.rounds + 1):
                shift = (round_no - 1) % len(systems)
                order = systems[shift:] + systems[:shift]
                _enqueue_round(order, round_no, args, floor_db)
                for system in order:
                    _process_round(system, round_no, args, Path(work), floor_db)
                for system in order:
                    _pickup_round(system, round_no, args, Path(work), floor_db)
                if args.partial is not None:
                    # A long run that fails later keeps what its finished rounds measured.
                    args.partial.write_text(json.dumps(_summary(systems, args, load_before), indent=2))
    finally:
        for target in [s.target for s in systems] + [floor_db]:
            if target is not None:
                try:
                    target.close()
                except Exception as exc:
                    _say(f"cleaning up failed: {exc!r}")
    return _summary(systems, args, load_before)


def _summary(
    systems: list[System], args: argparse.Namespace, load_before: tuple[float, float, float]
) -> dict[str, Any]:
    return {
        "settings": {k: v for k, v in vars(args).items() if k not in ("skip", "partial")},
        "environment": _environment(load_before),
        "systems": [
            {"key": s.key, "label": s.label, "figures": s.figures, "pickups": s.pickups} for s in systems
        ],
    }


# -- the three kinds of round -------------------------------------------------------------------------------
def _enqueue_round(
    order: list[System], round_no: int, args: argparse.Namespace, floor_db: SupabaseTarget
) -> None:
    env = floor_db.prepare(round_no, 0)
    url = env[DATABASE_URL_ENV]
    producers: dict[str, enqueue.Producer] = {}
    jobs: dict[str, int] = {}
    try:
        for system in order:
            for kind in system.enqueues:
                name = f"{system.key} {kind}"
                jobs[name] = args.batch_jobs if kind == "batch" else args.send_jobs
                if system.key == "floor":
                    producers[name] = enqueue.FloorSends(url)
                elif system.key == "insert":
                    producers[name] = enqueue.PlainInserts(url)
                elif system.key == "rabbitmq":
                    producers[name] = enqueue.RabbitmqSends(args.rabbitmq_url)
                elif kind == "batch":
                    producers[name] = enqueue.BrokerBatches(url)
                else:
                    producers[name] = enqueue.BrokerSends(url)
        rates = enqueue.interleaved(producers, jobs)
        for system in order:
            for kind in system.enqueues:
                rate = rates[f"{system.key} {kind}"]
                system.add(kind, rate)
                _say(f"round {round_no}: {system.key} {kind}: {rate:,.0f} jobs/s")
    finally:
        for producer in producers.values():
            producer.close()
        floor_db.finish_round()


def _process_round(
    system: System, round_no: int, args: argparse.Namespace, work: Path, floor_db: SupabaseTarget
) -> None:
    if not system.worker:
        return
    if system.key == "rest":
        rate, requests_per_job = _rest_round(round_no, args)
        system.add("requests_per_job", requests_per_job)
    elif system.target is None:
        rate = _floor_drain(round_no, args, floor_db)
    else:
        target = system.target
        try:
            env = target.prepare(round_no, args.jobs)
            worker = run_worker(
                target.worker_module,
                env=env,
                threads=args.threads,
                jobs=args.jobs,
                work_dir=work,
                timeout_s=120 + args.jobs / 200,
                processes=system.processes,
            )
            target.verify(args.jobs)
        finally:
            target.finish_round()
        rate = worker.jobs_per_s
    system.add("process", rate)
    _say(f"round {round_no}: {system.key} process: {rate:,.0f} jobs/s")


def _rest_round(round_no: int, args: argparse.Namespace) -> tuple[float, float]:
    """bench/rest_requests.py's round: the broker over RestTransport against the test endpoint."""
    from bench import rest_requests

    options = argparse.Namespace(
        jobs=args.jobs, threads=args.threads, claim_ahead=0, database_url=args.database_url
    )
    found = rest_requests.run_round(round_no, options)
    return found.jobs_per_s, found.requests_per_job


def _floor_drain(round_no: int, args: argparse.Namespace, floor_db: SupabaseTarget) -> float:
    env = floor_db.prepare(round_no, 0)
    url = env[DATABASE_URL_ENV]
    try:
        producer = FloorProducer(url)
        producer.conn.execute(
            "insert into bench_floor_jobs (id, queue_name, payload)"
            " select gen_random_uuid(), 'floor', '{}' from generate_series(1, %s)",
            (args.jobs,),
        )
        producer.conn.execute("vacuum analyze bench_floor_jobs")
        producer.close()
        done = subprocess.run(
            [sys.executable, "-m", "bench.floor", url, "--drain", str(args.jobs)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120 + args.jobs / 100,
            check=True,
        )
        return float(done.stdout.strip())
    finally:
        floor_db.finish_round()


def _pickup_round(
    system: System, round_no: int, args: argparse.Namespace, work: Path, floor_db: SupabaseTarget
) -> None:
    if not system.worker or system.key == "rest":
        return  # the test endpoint has no Realtime: its pickup is the poll interval
    rng = random.Random(round_no)
    gaps = [Gaps(args.pickups, 0.03, 0.1), Gaps(args.idle_pickups, *args.idle_gap)]
    listener = StampListener()
    try:
        if system.target is None:
            results = _floor_pickups(round_no, floor_db, listener, gaps, rng, work)
        else:
            results = _worker_pickups(system, round_no, args, listener, gaps, rng, work)
    finally:
        listener.close()
    for name, found in zip(("short", "idle"), results, strict=True):
        system.pickups.setdefault(name, []).extend(found.latencies_ms)
    _say(
        f"round {round_no}: {system.key} pickup: p50 {results[0].p50_ms:.2f} ms,"
        f" p95 {results[0].p95_ms:.2f} ms; after idle gaps p50 {results[1].p50_ms:.2f} ms,"
        f" max {max(results[1].latencies_ms):.1f} ms"
    )


def _worker_pickups(
    system: System,
    round_no: int,
    args: argparse.Namespace,
    listener: StampListener,
    gaps: list[Gaps],
    rng: random.Random,
    work: Path,
) -> list[Pickups]:
    target = system.target
    assert target is not None
    env = dict(target.prepare(round_no, 0))
    env[PICKUP_PORT_ENV] = str(listener.port)
    send: Callable[[float], Any]
    producer: Any
    try:
        if isinstance(target, SupabaseTarget):
            producer = SupabaseBroker(PostgresTransport(env[DATABASE_URL_ENV], pool_size=1))
        else:
            from dramatiq.brokers.rabbitmq import RabbitmqBroker

            producer = RabbitmqBroker(url=env.get(RABBITMQ_URL_ENV, args.rabbitmq_url))
        stamp = declare_stamp(producer)
        send = stamp.send
        try:
            with running_worker(
                target.worker_module, env, args.threads, work / "pickup.log", system.processes
            ):
                return measure(send, listener, gaps, rng)
        finally:
            producer.close()
    finally:
        target.finish_round()


def _floor_pickups(
    round_no: int,
    floor_db: SupabaseTarget,
    listener: StampListener,
    gaps: list[Gaps],
    rng: random.Random,
    work: Path,
) -> list[Pickups]:
    env = floor_db.prepare(round_no, 0)
    url = env[DATABASE_URL_ENV]
    producer = FloorProducer(url)
    command = [sys.executable, "-m", "bench.floor", url, "--pickup-port", str(listener.port)]
    try:
        with (work / "floor.log").open("wb") as log:
            worker = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                return measure(lambda sent_at: producer.send({"sent_at": sent_at}), listener, gaps, rng)
            finally:
                worker.kill()
                worker.wait()
    finally:
        producer.close()
        floor_db.finish_round()


# -- the table ----------------------------------------------------------------------------------------------
def render_markdown(summary: dict[str, Any]) -> str:
    """One table: medians over rounds, pickups over every sample of every round."""
    settings, env = summary["settings"], summary["environment"]
    systems = summary["systems"]
    floor = next((s for s in systems if s["key"] == "floor"), None)
    best = next((s for s in systems if s["key"] == "prefetch"), None)
    one = next((s for s in systems if s["key"] == "default"), None)

    def median(system: dict[str, Any] | None, name: str) -> float | None:
        values = (system or {}).get("figures", {}).get(name)
        return statistics.median(values) if values else None

    def cell(value: float | None, fmt: str = "{:,.0f}") -> str:
        return "—" if value is None else fmt.format(value)

    def pickup(system: dict[str, Any], name: str) -> str:
        values = system["pickups"].get(name) or []
        found = Pickups(values)
        return "—" if not values else f"{found.p50_ms:.1f} / {found.p95_ms:.1f}"

    lines = [
        f"{settings['rounds']} interleaved rounds; {settings['jobs']:,} no-op jobs per processing round, "
        f"{settings['threads']} threads per worker process; send: {settings['send_jobs']:,} calls, batch: "
        f"{settings['batch_jobs']:,} jobs in lists of {enqueue.BATCH_SIZE:,}, per round, in {enqueue.BLOCKS} "
        f"blocks taking turns; pickups: "
        f"{settings['pickups']} per round after 30-100 ms gaps, {settings['idle_pickups']} per round after "
        f"{settings['idle_gap'][0]:g}-{settings['idle_gap'][1]:g} s idle gaps.",
        f"{env['date']}; {env['cpus']} CPUs ({env['cpu_model']}); Python {env['python']}; load average "
        f"before/after: {env['load_average_before'][0]:.2f}/{env['load_average_after'][0]:.2f}.",
        "",
        "| system | send jobs/s | batch jobs/s | process jobs/s | pickup p50 / p95 ms "
        "| after idle gaps p50 / p95 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for system in systems:
        lines.append(
            f"| {system['label']} | {cell(median(system, 'send'))} | {cell(median(system, 'batch'))} "
            f"| {cell(median(system, 'process'))} | {pickup(system, 'short')} | {pickup(system, 'idle')} |"
        )
    ratios = []
    if best is not None and floor is not None:
        ratios.append(_ratio("send() / floor INSERT", best, floor, "send"))
    if one is not None and best is not None:
        ratios.append(_ratio("service default / prefetch, processing", one, best, "process"))
    history = next((s for s in systems if s["key"] == "history"), None)
    if history is not None and one is not None:
        ratios.append(_ratio("history table / empty table, processing", history, one, "process"))
    two = next((s for s in systems if s["key"] == "two"), None)
    if two is not None and one is not None:
        ratios.append(_ratio("2 processes / 1 process", two, one, "process"))
    insert = next((s for s in systems if s["key"] == "insert"), None)
    if best is not None and insert is not None:
        ratios.append(_ratio("send() / hand-written INSERT into coding_jobs", best, insert, "send"))
    rest = next((s for s in systems if s["key"] == "rest"), None)
    if rest is not None and median(rest, "requests_per_job") is not None:
        ratios.append(f"REST HTTP requests per job {median(rest, 'requests_per_job'):.3f}")
    lines += ["", "Ratios (median of per-round ratios): " + "; ".join(r for r in ratios if r) + "."]
    return "\n".join(lines)


def _ratio(title: str, top: dict[str, Any], bottom: dict[str, Any], name: str) -> str:
    a, b = top["figures"].get(name) or [], bottom["figures"].get(name) or []
    pairs = [x / y for x, y in zip(a, b, strict=False) if y]
    return f"{title} {statistics.median(pairs):.2f}" if pairs else ""


def _environment(load_before: tuple[float, float, float]) -> dict[str, Any]:
    from bench.throughput import _cpu_model

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except BenchError as exc:
        _say(f"benchmark failed: {exc}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    print(json.dumps(summary, indent=2) if args.json else render_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
