"""`supabase-queue-worker`: the operator's command line, over either transport, through the queue's functions.

    supabase-queue-worker stats [--actors] [--json]        counts by queue (and actor) and status, oldest wait
    supabase-queue-worker jobs [--status S] [--queue Q] [--actor A] [--error TEXT] [--user ID] [--limit N]
    supabase-queue-worker job ID                           one job with its attempts
    supabase-queue-worker retry [ID...] [--queue Q] [--actor A] [--error TEXT] [--cancelled|--all] [--dry-run]
    supabase-queue-worker cancel ID... [--reason TEXT]
    supabase-queue-worker pause QUEUE [--reason TEXT] | resume QUEUE
    supabase-queue-worker prune [--completed-days N] [--failed-days N]
    supabase-queue-worker workers                          which workers hold which jobs
    supabase-queue-worker plans                            fair share: each plan's tier, cap, users at it
    supabase-queue-worker plans set PLAN --priority N (--max-running M | --no-cap) | plans delete PLAN
    supabase-queue-worker fairness [on|off] [--aging-step-ms N]   the switch and the aging step

Every read command takes `--json`. The queue is the one the settings point at (DATABASE_URL, or SUPABASE_URL
and the service role key), like the worker's. Exit codes: 0 done, 1 the queue refused the request (no such job
or plan), 2 a configuration or usage mistake, 3 the queue cannot be reached. The fair share commands live in
ops/fair_share.py.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from broker.errors import ConnectionClosed, QueueAccessDenied, QueueError, QueueSchemaMissing
from broker.operator_records import JOB_STATUSES, MAX_LISTED_JOBS, JobFilter, PausedQueue
from broker.retention import retention_ms
from broker.transport import Transport
from ops import fair_share
from ops.arguments import whole
from ops.render import ago, duration, print_json, print_table
from service.errors import ConfigurationError
from service.exit_codes import EXIT_CONFIGURATION, EXIT_REFUSED, EXIT_UNREACHABLE
from service.logs import report_configuration_error
from service.settings import Settings, load_settings
from service.transports import build_transport

PROGRAM = "supabase-queue-worker"
#: Most prune calls one `prune` command makes (each deletes up to BATCH x BATCHES rows).
MAX_PRUNE_CALLS = 200


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=PROGRAM, description="Operate the coding_jobs queue.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return sub

    stats = command("stats", "jobs by queue and status, the oldest wait, workers and pauses")
    stats.add_argument("--actors", action="store_true", help="also by actor")

    jobs = command("jobs", "list jobs (every filter given must hold)")
    jobs.add_argument("--status", choices=JOB_STATUSES)
    jobs.add_argument("--queue")
    jobs.add_argument("--actor")
    jobs.add_argument("--error", help="a piece of the error text (any case)")
    jobs.add_argument("--user", help="a user id")
    jobs.add_argument(
        "--limit",
        type=whole(1, MAX_LISTED_JOBS),
        default=50,
        help=f"at most this many (up to {MAX_LISTED_JOBS})",
    )

    job = command("job", "one job with its attempts")
    job.add_argument("job_id", metavar="ID")

    retry = command("retry", "put failed (or cancelled) jobs back in the queue with a fresh retry budget")
    retry.add_argument("job_ids", nargs="*", metavar="ID")
    retry.add_argument("--queue")
    retry.add_argument("--actor")
    retry.add_argument("--error", help="a piece of the error text (any case)")
    retry.add_argument("--cancelled", action="store_true", help="retry cancelled jobs instead of failed ones")
    retry.add_argument("--all", action="store_true", help="with no other filter: every failed job")
    retry.add_argument("--dry-run", action="store_true", help="say what would be retried; change nothing")
    retry.add_argument("--limit", type=whole(1), default=1000)

    cancel = command("cancel", "cancel jobs: pending ones never run, running ones are stopped")
    cancel.add_argument("job_ids", nargs="+", metavar="ID")
    cancel.add_argument("--reason")

    pause = command("pause", "stop claims from a queue (running jobs finish)")
    pause.add_argument("queue")
    pause.add_argument("--reason")
    resume = command("resume", "let workers claim from a queue again")
    resume.add_argument("queue")

    prune = command("prune", "delete finished jobs past their retention now")
    prune.add_argument(
        "--completed-days", type=whole(0), help="keep completed and cancelled jobs this long (0: keep them)"
    )
    prune.add_argument("--failed-days", type=whole(0), help="keep failed jobs this long (0: keep them)")

    command("workers", "registered workers and the jobs each holds")
    fair_share.add_commands(command)
    return top


def run(argv: Sequence[str], transport: Transport, settings: Settings, out: TextIO) -> int:
    """Run one command against `transport`; returns the exit code. Raises the queue's errors."""
    top = parser()
    args = top.parse_args(list(argv))
    if args.command == "retry" and not (args.job_ids or args.queue or args.actor or args.error or args.all):
        top.error("retry needs job ids, --queue, --actor or --error (or --all for every failed job)")
    handler = {
        "stats": _stats,
        "jobs": _jobs,
        "job": _job,
        "retry": _retry,
        "cancel": _cancel,
        "pause": _pause,
        "resume": _resume,
        "prune": _prune,
        "workers": _workers,
        "plans": fair_share.plans_command,
        "fairness": fair_share.fairness_command,
    }[args.command]
    return handler(args, transport, settings, out)


def _stats(args: argparse.Namespace, transport: Transport, settings: Settings, out: TextIO) -> int:
    now = datetime.now(UTC)
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    waits: dict[str, float] = {}
    for stat in transport.stats():
        counts[stat.queue_name][stat.status] = stat.jobs
        if stat.status == "pending" and stat.oldest_due_at is not None:
            waits[stat.queue_name] = max((now - stat.oldest_due_at).total_seconds(), 0.0)
    consumers = transport.consumers()
    paused = {p.queue_name: p for p in transport.paused_queues()}
    names = sorted(set(counts) | set(consumers) | set(paused))
    actors = transport.actor_stats() if args.actors else []
    if args.json:
        queues = [
            {
                "queue": name,
                "jobs": {status: counts[name].get(status, 0) for status in JOB_STATUSES},
                "oldest_pending_wait_s": waits.get(name),
                "workers": consumers.get(name, 0),
                "paused": paused.get(name),
            }
            for name in names
        ]
        print_json(out, {"queues": queues, "actors": actors} if args.actors else {"queues": queues})
        return 0
    headers = ["QUEUE", *(s.upper() for s in JOB_STATUSES), "OLDEST WAIT", "WORKERS", "PAUSED"]
    print_table(
        out,
        headers,
        [
            [
                name,
                *(counts[name].get(status, 0) for status in JOB_STATUSES),
                duration(waits[name]) if name in waits else None,
                consumers.get(name, 0),
                _paused_since(paused[name]) if name in paused else None,
            ]
            for name in names
        ],
    )
    for name in names:
        if counts[name].get("pending") and not consumers.get(name):
            out.write(f"warning: queue {name!r} has pending jobs and no worker consumes it\n")
    if args.actors:
        out.write("\n")
        print_table(
            out,
            ["QUEUE", "ACTOR", "STATUS", "JOBS", "EVER"],
            [[a.queue_name, a.actor_name, a.status, a.jobs, a.entered] for a in actors],
        )
    return 0


def _paused_since(paused: PausedQueue) -> str:
    return "yes" if paused.paused_at is None else f"since {ago(paused.paused_at)}"


def _jobs(args: argparse.Namespace, transport: Transport, settings: Settings, out: TextIO) -> int:
    where = JobFilter(
        status=args.status, queue_name=args.queue, actor_name=args.actor, error=args.error, user_id=args.user
    )
    jobs = transport.list_jobs(where, limit=args.limit)
    if args.json:
        print_json(out, jobs)
        return 0
    print_table(
        out,
        ["ID", "STATUS", "QUEUE", "ACTOR", "TRIES", "WORKER", "CREATED", "FINISHED", "ERROR / PROMPT"],
        [
            [
                job.id,
                job.status
                + (" (cancelling)" if job.cancel_requested_at and job.status == "processing" else ""),
                job.queue_name,
                job.actor_name,
                f"{job.retry_count}/{job.max_retries}",
                job.locked_by,
                job.created_at,
                job.completed_at,
                job.error or job.prompt,
            ]
            for job in jobs
        ],
    )
    return 0


def _job(args: argparse.Namespace, transport: Transport, settings: Settings, out: TextIO) -> int:
    job = transport.get_job(args.job_id)
    if job is None:
        out.write(f"no job {args.job_id}\n")
        return EXIT_REFUSED
    if args.json:
        print_json(out, job)
        return 0
    facts = [
        ("id", job.id),
        ("status", job.status + (" (cancellation asked)" if job.cancel_requested_at else "")),
        ("queue / actor", f"{job.queue_name} / {job.actor_name}"),
        ("priority", job.priority),
        ("retries", f"{job.retry_count} of {job.max_retries}; rescues {job.rescue_count}"),
        ("created", job.created_at),
        ("runs at", job.run_at),
        ("started", job.started_at),
        ("finished", job.completed_at),
        ("held by", job.locked_by),
        ("lease ends", job.lease_expires_at),
        ("user", job.user_id),
        ("idempotency key", job.idempotency_key),
        ("periodic tick", job.periodic_tick),
        ("prompt", f"{job.prompt} ({job.prompt_length} characters)" if job.prompt_length else None),
        ("error", job.error_message),
    ]
    print_table(out, ["FIELD", "VALUE"], facts)
    out.write("\nattempts (oldest first):\n")
    print_table(
        out,
        ["#", "WORKER", "STARTED", "TOOK", "OUTCOME", "ERROR"],
        [
            [
                a.attempt,
                a.worker,
                a.started_at,
                duration((a.ended_at - a.started_at).total_seconds())
                if a.ended_at and a.started_at
                else None,
                a.outcome,
                a.error,
            ]
            for a in job.attempts
        ],
    )
    return 0


def _retry(args: argparse.Namespace, transport: Transport, settings: Settings, out: TextIO) -> int:
    where = JobFilter(
        status="cancelled" if args.cancelled else "failed",
        queue_name=args.queue,
        actor_name=args.actor,
        error=args.error,
        job_ids=tuple(args.job_ids) or None,
    )
    retried = transport.retry_jobs(where, every=args.all, dry_run=args.dry_run, limit=args.limit)
    if args.json:
        print_json(out, {"dry_run": args.dry_run, "jobs": retried})
        return 0
    print_table(
        out, ["ID", "QUEUE", "ACTOR", "ERROR"], [[j.id, j.queue_name, j.actor_name, j.error] for j in retried]
    )
    if args.dry_run:
        out.write(f"Would retry {len(retried)} {where.status} job(s) (dry run: nothing changed).\n")
    else:
        out.write(f"Retried {len(retried)} {where.status} job(s).\n")
    return 0


def _cancel(args: argparse.Namespace, transport: Transport, settings: Settings, out: TextIO) -> int:
    outcomes = transport.cancel(args.job_ids, args.reason)
    if args.json:
        print_json(out, outcomes)
    else:
        print_table(out, ["ID", "OUTCOME"], [[o.job_id, o.outcome] for o in outcomes])
    return EXIT_REFUSED if any(o.outcome == "not_found" for o in outcomes) else 0


def _pause(args: argparse.Namespace, transport: Transport, settings: Settings, out: TextIO) -> int:
    paused = transport.pause_queue(args.queue, args.reason)
    if args.json:
        print_json(out, paused)
    else:
        out.write(f"Paused queue {paused.queue_name!r}: workers claim nothing from it until it is resumed.\n")
    return 0


def _resume(args: argparse.Namespace, transport: Transport, settings: Settings, out: TextIO) -> int:
    resumed = transport.resume_queue(args.queue)
    if args.json:
        print_json(out, {"queue": args.queue, "resumed": resumed})
    else:
        out.write(
            f"Resumed queue {args.queue!r}.\n" if resumed else f"Queue {args.queue!r} was not paused.\n"
        )
    return 0


def _prune(args: argparse.Namespace, transport: Transport, settings: Settings, out: TextIO) -> int:
    completed_days = settings.completed_retention_days if args.completed_days is None else args.completed_days
    failed_days = settings.failed_retention_days if args.failed_days is None else args.failed_days
    deleted, calls, more = 0, 0, True
    while more and calls < MAX_PRUNE_CALLS:
        result = transport.prune(retention_ms(completed_days), retention_ms(failed_days))
        deleted, calls, more = deleted + result.deleted, calls + 1, result.more
    if args.json:
        print_json(out, {"deleted": deleted, "more": more})
    else:
        out.write(
            f"Deleted {deleted} finished job(s) (completed and cancelled older than {completed_days} day(s), "
            f"failed older than {failed_days}; 0 keeps them){'; more remain' if more else ''}.\n"
        )
    return 0


def _workers(args: argparse.Namespace, transport: Transport, settings: Settings, out: TextIO) -> int:
    workers = transport.workers()
    running = transport.list_jobs(JobFilter(status="processing"), limit=MAX_LISTED_JOBS)
    if args.json:
        print_json(out, {"workers": workers, "running": running})
        return 0
    print_table(
        out,
        ["WORKER", "HOST", "PID", "PRESENCE", "QUEUES", "HEARTBEAT", "JOBS"],
        [
            [
                w.worker_id,
                w.hostname,
                w.pid,
                w.presence + (" (lost)" if w.lost_at else ""),
                ",".join(w.queues),
                w.heartbeat_at,
                len(w.jobs),
            ]
            for w in workers
        ],
    )
    out.write("\nheld jobs:\n")
    print_table(
        out,
        ["JOB", "WORKER", "QUEUE", "ACTOR", "STARTED", "LEASE ENDS"],
        [[j.id, j.locked_by, j.queue_name, j.actor_name, j.started_at, j.lease_expires_at] for j in running],
    )
    return 0


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """The console script: the settings' queue, one command, an exit code."""
    out = out or sys.stdout
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser().parse_args(arguments)  # usage mistakes first, before any setting is read
    try:
        settings = load_settings()
        transport = build_transport(settings)
    except ConfigurationError as exc:
        report_configuration_error(exc, logger_name=PROGRAM)
        return EXIT_CONFIGURATION
    try:
        # On a connection of its own: a wrong password or a missing migration says so at once, where the pool
        # would wait out its timeout.
        transport.check_schema()
        return run(arguments, transport, settings, out)
    except (QueueSchemaMissing, QueueAccessDenied) as exc:
        sys.stderr.write(f"{PROGRAM}: {exc}\n")
        return EXIT_CONFIGURATION
    except ConnectionClosed as exc:
        sys.stderr.write(f"{PROGRAM}: cannot reach the queue ({exc})\n")
        return EXIT_UNREACHABLE
    except (QueueError, ValueError) as exc:
        sys.stderr.write(f"{PROGRAM}: {exc}\n")
        return EXIT_REFUSED
    finally:
        transport.close()
