"""No-op jobs per second through one `dramatiq` process: our SupabaseBroker beside Dramatiq's RabbitmqBroker.

Usage: .venv/bin/python bench/throughput.py --jobs 20000 --rounds 3 [--brokers supabase,rabbitmq] [--json]

Each round pre-loads the jobs, starts `dramatiq bench.<broker>_worker --processes 1 --threads 8`, and
times the worker from its first settled job to its last (bench/README.md says why that is fair). Rounds
alternate between the brokers, in a rotating order, so a noisy machine slows them alike. The Markdown
table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: the repository root holds the `bench` package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.environment import DEFAULT_ADMIN_URL, DEFAULT_RABBITMQ_URL, DEFAULT_REDIS_URL, DEFAULT_THREADS
from bench.profiler import PySpy
from bench.report import RoundResult, render_markdown, summarise
from bench.targets import BenchError, RabbitmqTarget, RedisTarget, SupabaseTarget, Target
from bench.worker_process import run_worker

BROKERS = ("supabase", "supabase-default", "rabbitmq", "redis")
#: Seconds a round may take, boot included, beyond what the slowest plausible rate (200 jobs/s) needs.
MIN_ROUND_TIMEOUT_S = 60.0
SLOWEST_RATE_PER_S = 200


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="no-op jobs per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per broker (default 3)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="worker threads (default 8)")
    parser.add_argument(
        "--brokers",
        default=",".join(BROKERS),
        help="comma-separated from supabase, rabbitmq, redis (default all; one not answering is skipped)",
    )
    parser.add_argument(
        "--database-url", default=DEFAULT_ADMIN_URL, help="superuser URL; scratch databases go there"
    )
    parser.add_argument("--rabbitmq-url", default=DEFAULT_RABBITMQ_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per round (default from --jobs)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record a py-spy profile of each round's worker into DIR (needs py-spy)",
    )
    args = parser.parse_args(argv)
    args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = set(args.brokers) - set(BROKERS)
    if unknown or not args.brokers:
        parser.error(f"--brokers: choose from {', '.join(BROKERS)}")
    if args.jobs < 2 or args.rounds < 1 or args.threads < 1:
        parser.error("--jobs must be at least 2, --rounds and --threads at least 1")
    if args.timeout is None:
        args.timeout = MIN_ROUND_TIMEOUT_S + args.jobs / SLOWEST_RATE_PER_S
    return args


def build_targets(args: argparse.Namespace) -> list[Target]:
    made: dict[str, Target] = {
        "supabase": SupabaseTarget(args.database_url, prefix=f"bench_throughput_{os.getpid()}"),
        "supabase-default": SupabaseTarget(
            args.database_url,
            prefix=f"bench_throughput_default_{os.getpid()}",
            claim_ahead=0,
            name="supabase-default",
            label="SupabaseBroker, service default (CLAIM_AHEAD_JOBS=0)",
        ),
        "rabbitmq": RabbitmqTarget(args.rabbitmq_url),
        "redis": RedisTarget(args.redis_url),
    }
    return [made[name] for name in args.brokers]


def run(args: argparse.Namespace) -> dict[str, Any]:
    targets = build_targets(args)
    ready: list[Target] = []
    results: list[RoundResult] = []
    try:
        for target in targets:
            try:
                target.setup()
            except BenchError as exc:
                _say(f"skipping {target.name}: {exc}")
                continue
            ready.append(target)
        if not ready:
            raise BenchError("no broker answered")
        profiler = PySpy(args.profile) if args.profile else None
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory(prefix="bench-throughput-") as work:
            for round_no in range(1, args.rounds + 1):
                # Rotate the order each round: no broker always runs first, on a cold machine, or last.
                shift = (round_no - 1) % len(ready)
                for target in ready[shift:] + ready[:shift]:
                    results.append(run_round(target, round_no, args, Path(work), profiler))
        return summarise(results, args=vars(args), environment=_environment(load_before))
    finally:
        for target in targets:
            try:
                target.close()
            except Exception as exc:
                _say(f"cleaning up {target.name} failed: {exc!r}")


def run_round(
    target: Target, round_no: int, args: argparse.Namespace, work: Path, profiler: PySpy | None
) -> RoundResult:
    _say(f"round {round_no}: {target.name}: pre-loading {args.jobs} jobs ...")
    try:
        env = target.prepare(round_no, args.jobs)
        _say(f"round {round_no}: {target.name}: running the worker ...")
        worker = run_worker(
            target.worker_module,
            env=env,
            threads=args.threads,
            jobs=args.jobs,
            work_dir=work,
            timeout_s=args.timeout,
            on_started=profiler.recorder(f"{target.name}-r{round_no}") if profiler else None,
        )
        extra = target.verify(args.jobs)
    finally:
        if profiler is not None:
            profiler.finish()
        target.finish_round()
    if worker.failed:
        raise BenchError(f"{target.name}: {worker.failed} of {worker.settled} no-op jobs failed")
    _say(
        f"round {round_no}: {target.name}: {worker.jobs_per_s:,.0f} jobs/s"
        f" ({worker.first_to_last_s:.2f} s first to last, start-up {worker.startup_s:.2f} s)"
    )
    return RoundResult(
        broker=target.name,
        label=target.label,
        round_no=round_no,
        jobs=worker.settled,
        jobs_per_s=worker.jobs_per_s,
        first_to_last_s=worker.first_to_last_s,
        startup_s=worker.startup_s,
        extra=extra,
    )


def _environment(load_before: tuple[float, float, float]) -> dict[str, Any]:
    import dramatiq

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "dramatiq": dramatiq.__version__,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
