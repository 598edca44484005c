"""Helpers for in-process broker tests: brokers, workers, bounded waits and the queue's rows."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import dramatiq
import psycopg
from dramatiq.middleware import CurrentMessage, Middleware
from psycopg import sql
from psycopg.types.json import Jsonb

from broker.broker import SupabaseBroker
from broker.transport import Transport

T = TypeVar("T")

#: Milliseconds between claims of an idle queue in tests: small, so tests never wait for a poll for long.
TEST_POLL_INTERVAL_MS = 200
#: Milliseconds a Worker's threads wait on an idle queue before checking whether they should stop.
WORKER_TIMEOUT_MS = 100
#: Milliseconds Worker.stop may wait for running jobs.
STOP_TIMEOUT_MS = 10_000
#: Seconds between checks of a waited-for condition.
WAIT_STEP_S = 0.02
#: The coding actor's module.

Row = dict[str, Any]
Db = psycopg.Connection[Row]
#: Builds a transport of the test's kind over the test's database (keyword: pool_size).
TransportFactory = Callable[..., Transport]
#: Builds a broker on a transport of its own (keywords: pool_size and build_broker's).
BrokerFactory = Callable[..., SupabaseBroker]


class WaitTimeout(AssertionError):
    """Raised when a waited-for condition did not hold before its deadline."""


def wait_until(predicate: Callable[[], T], timeout_s: float, describe: str | Callable[[], object]) -> T:
    """Poll `predicate` until it returns something truthy, and return that; raise WaitTimeout at the deadline.

    `describe` says what was awaited; a callable is called at the deadline, so it can show the current state.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = describe() if callable(describe) else describe
            raise WaitTimeout(f"not true within {timeout_s:g} s: {detail}")
        time.sleep(WAIT_STEP_S)


def build_broker(
    transport: Transport,
    *,
    poll_interval_ms: int = TEST_POLL_INTERVAL_MS,
    lease_ms: int = 60_000,
    worker_id: str | None = None,
    claim_ahead: int | None = None,
    **options: Any,
) -> SupabaseBroker:
    """A SupabaseBroker as `tasks` builds one, with the CurrentMessage middleware the test actors need."""
    broker = SupabaseBroker(
        transport,
        poll_interval_ms=poll_interval_ms,
        lease_ms=lease_ms,
        worker_id=worker_id,
        claim_ahead=claim_ahead,
        **options,
    )
    broker.add_middleware(CurrentMessage())
    return broker


class Settlements(Middleware):
    """Records what the worker did with each message: acked, nacked, or pushed onto its delay queue."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.acked: list[str] = []
        self.nacked: list[str] = []
        #: Messages Dramatiq's consumer thread put on its in-memory delay queue: a database broker must not.
        self.delayed: list[str] = []

    def after_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        with self._cond:
            self.acked.append(message.message_id)
            self._cond.notify_all()

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        with self._cond:
            self.nacked.append(message.message_id)
            self._cond.notify_all()

    def before_delay_message(self, broker: dramatiq.Broker, message: Any) -> None:
        with self._cond:
            self.delayed.append(message.message_id)

    def wait_settled(self, message_id: str, timeout_s: float) -> str:
        """Wait until the worker acked or nacked the message; returns "ack" or "nack"."""
        with self._cond:
            settled = self._cond.wait_for(
                lambda: message_id in self.acked or message_id in self.nacked, timeout=timeout_s
            )
            if not settled:
                raise WaitTimeout(f"message {message_id} was neither acked nor nacked within {timeout_s:g} s")
            return "ack" if message_id in self.acked else "nack"


@contextmanager
def running_worker(
    broker: dramatiq.Broker,
    *,
    threads: int = 2,
    queues: set[str] | None = None,
    prefetch: int | None = None,
    stop_timeout_ms: int = STOP_TIMEOUT_MS,
) -> Iterator[dramatiq.Worker]:
    """An in-process dramatiq.Worker, always stopped on the way out.

    `prefetch` overrides Dramatiq's threads * 2, which it otherwise takes from the environment only.
    """
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=WORKER_TIMEOUT_MS, queues=queues)
    if prefetch is not None:
        worker.queue_prefetch = prefetch
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(timeout=stop_timeout_ms)


# -- the queue's rows ---------------------------------------------------------------------------------
def job(db: Db, job_id: str) -> Row:
    """The row of one job; fails the test when it does not exist."""
    row = db.execute("select * from public.coding_jobs where id = %s", (job_id,)).fetchone()
    assert row is not None, f"no row for job {job_id}"
    return row


def jobs(db: Db, job_ids: Iterable[str] | None = None) -> list[Row]:
    """Rows of the given jobs (all rows when None), oldest first."""
    if job_ids is None:
        return db.execute("select * from public.coding_jobs order by created_at, id").fetchall()
    return db.execute(
        "select * from public.coding_jobs where id = any(%s::uuid[]) order by created_at, id",
        (list(job_ids),),
    ).fetchall()


def status_counts(db: Db) -> dict[str, int]:
    """Jobs per status over the whole table."""
    rows = db.execute("select status::text as status, count(*) as n from public.coding_jobs group by 1")
    return {row["status"]: int(row["n"]) for row in rows.fetchall()}


def wait_for_status(db: Db, job_id: str, status: str, timeout_s: float) -> Row:
    """Wait until the job's row has `status`; returns the row."""
    return wait_until(
        lambda: (row := job(db, job_id))["status"] == status and row,
        timeout_s,
        lambda: f"job {job_id} to be {status}, it is: {_brief(job(db, job_id))}",
    )


def wait_for_all(db: Db, job_ids: Iterable[str], status: str, timeout_s: float) -> list[Row]:
    """Wait until every given job's row has `status`; returns the rows."""
    ids = list(job_ids)

    def all_there() -> list[Row]:
        rows = jobs(db, ids)
        return rows if len(rows) == len(ids) and all(r["status"] == status for r in rows) else []

    return wait_until(
        all_there, timeout_s, lambda: f"all {len(ids)} jobs {status}; statuses now {status_counts(db)}"
    )


def insert_job(db: Db, **columns: Any) -> str:
    """Insert a row with plain INSERT, as the Edge Function does; dicts and lists are stored as jsonb."""
    values = [Jsonb(v) if isinstance(v, dict | list) else v for v in columns.values()]
    query: sql.SQL | sql.Composed = sql.SQL(
        "insert into public.coding_jobs ({}) values ({}) returning id"
    ).format(
        sql.SQL(", ").join(sql.Identifier(name) for name in columns),
        sql.SQL(", ").join(sql.Placeholder() for _ in columns),
    )
    if not columns:
        query = sql.SQL("insert into public.coding_jobs default values returning id")
    row = db.execute(query, values).fetchone()
    assert row is not None
    return str(row["id"])


def _brief(row: Row) -> dict[str, Any]:
    keys = ("status", "actor_name", "queue_name", "retry_count", "run_at", "locked_by", "error_message")
    return {k: row.get(k) for k in keys}


def user_at_the_free_cap(db: Db, jobs: int = 3, worker_id: str = "capped-worker") -> str:
    """A Free user (cap 1) with `jobs` due jobs: one claimed by a registered worker, the rest capped."""
    user = str(uuid.uuid4())
    for n in range(jobs):
        insert_job(db, prompt=f"free job {n}", user_id=user, priority=0)
    db.execute("select public.register_worker(%s, 'heartbeat', 600000)", (worker_id,))
    claimed = db.execute(
        "select id from public.claim_jobs(%s, 'default', %s, 60000, %s::uuid)",
        (worker_id, jobs, str(uuid.uuid4())),
    ).fetchall()
    assert len(claimed) == 1, "the Free cap lets one job of the user start"
    return user
