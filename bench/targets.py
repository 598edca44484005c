"""The brokers under test, from the harness's side: set up, pre-load a round's jobs, check the round after."""

from __future__ import annotations

import abc
import contextlib
import time
from typing import Any

import psycopg
from dramatiq.message import Message
from psycopg import sql

from bench.environment import (
    CLAIM_AHEAD_ENV,
    DATABASE_URL_ENV,
    DEFAULT_RABBITMQ_URL,
    DEFAULT_REDIS_URL,
    RABBITMQ_URL_ENV,
    REDIS_NAMESPACE,
    REDIS_URL_ENV,
)
from bench.noop_actors import ACTOR_NAME, QUEUE_NAME, declare_actor
from broker.messages import new_job
from broker.postgres import PostgresTransport

#: Jobs per enqueue_jobs call when pre-loading our queue: one JSON array per round trip.
ENQUEUE_BATCH = 2_000
#: Seconds a pre-loaded queue may take to show all its messages.
PRELOAD_SETTLE_TIMEOUT_S = 60.0
#: Seconds the server may take to publish a stopped worker's function statistics.
STATS_FLUSH_TIMEOUT_S = 5.0
#: The queue functions the worker calls: each call is one SQL round trip.
WORKER_FUNCTIONS = (
    "claim_jobs",
    "complete_job",
    "complete_jobs",
    "requeue_expired_leases",
    "extend_leases",
    "release_jobs",
    "retry_job",
    "dead_letter_job",
)


#: A month of history: completed rows (one in twenty failed, with an error), spread over 30 days, most with a
#: user and a prompt like the Edge Function's rows. Parameters: the number of rows, twice.
HISTORY_SQL = """
insert into public.coding_jobs
  (id, user_id, prompt, status, queue_name, actor_name, args, kwargs, options, retry_count, max_retries,
   error_message, created_at, run_at, started_at, completed_at, claim_token, locked_by)
select gen_random_uuid(),
       case when i %% 10 <> 0 then gen_random_uuid() end,
       'Refactor the payment module and add tests for the refund path, case ' || i,
       case when i %% 20 = 0 then 'failed'::public.job_status else 'completed'::public.job_status end,
       'bench_throughput', 'bench_noop', '[]', '{}', '{}', 0, 3,
       case when i %% 20 = 0 then 'RuntimeError: the sandbox exited with status 137 (case ' || i || ')' end,
       at, at, at + interval '1 second', at + interval '40 seconds', gen_random_uuid(), 'history:1:0'
  from generate_series(1, %s) as i,
       lateral (select now() - interval '30 days' + i * (interval '30 days' / %s)) as t(at)
"""


class BenchError(Exception):
    """Raised when a round cannot run or its result does not add up; the message says what was seen."""


class Target(abc.ABC):
    """One broker under test."""

    #: Short name used on the command line and in --json.
    name: str
    #: Name shown in the table.
    label: str
    #: The module `dramatiq` imports in the worker process.
    worker_module: str

    @abc.abstractmethod
    def setup(self) -> None:
        """Check the server answers and make what every round shares; raise BenchError when it cannot."""

    @abc.abstractmethod
    def prepare(self, round_no: int, jobs: int) -> dict[str, str]:
        """Empty the queue, pre-load `jobs` messages; return the worker's extra environment."""

    @abc.abstractmethod
    def verify(self, jobs: int) -> dict[str, Any]:
        """After the worker stopped: check every job was settled once; return extra figures for the report."""

    def finish_round(self) -> None:  # noqa: B027 - most brokers keep nothing per round
        """Drop what only this round used."""

    def close(self) -> None:  # noqa: B027
        """Drop what setup made."""


class SupabaseTarget(Target):
    """Our SupabaseBroker over direct PostgreSQL, one fresh database per round, cloned from a migrated one."""

    name = "supabase"
    label = "SupabaseBroker (PostgreSQL)"
    worker_module = "bench.supabase_worker"

    def __init__(
        self,
        admin_url: str,
        prefix: str,
        *,
        claim_ahead: int | None = None,
        history_rows: int = 0,
        name: str = "",
        label: str = "",
    ) -> None:
        self.admin_url = admin_url
        #: None: Dramatiq's prefetch (twice the threads); a number: the service's CLAIM_AHEAD_JOBS.
        self.claim_ahead = claim_ahead
        #: Completed and failed rows each round's table starts with (a month of history).
        self.history_rows = history_rows
        self._history: dict[str, int] = {}
        self.name = name or self.name
        self.label = label or self.label
        self.template = f"{prefix}_template"
        self.round_database: str | None = None
        self.round_url = ""
        self._created: set[str] = set()

    def setup(self) -> None:
        from service.migrate import apply_migrations

        try:
            url = self._create(self.template, template=None)
            apply_migrations(url, bootstrap=True)
            if self.history_rows:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(HISTORY_SQL, (self.history_rows, self.history_rows))
                    conn.execute("vacuum analyze public.coding_jobs")
                    self._history = _statuses(conn)
        except psycopg.Error as exc:
            raise BenchError(f"PostgreSQL at {self.admin_url}: {exc}") from exc

    def prepare(self, round_no: int, jobs: int) -> dict[str, str]:
        self.round_database = f"{self.template.removesuffix('_template')}_r{round_no}"
        self.round_url = self._create(self.round_database, template=self.template)
        with self._admin() as conn:
            # Per database, superuser-only: counts the queue functions' calls, i.e. the worker's round trips.
            conn.execute(
                sql.SQL("alter database {} set track_functions = 'pl'").format(
                    sql.Identifier(self.round_database)
                )
            )
        transport = PostgresTransport(self.round_url, pool_size=1, poll_only=True)
        try:
            for start in range(0, jobs, ENQUEUE_BATCH):
                # The rows broker.enqueue would write for noop.send(), many per round trip.
                batch = [
                    new_job(_noop_message(), default_max_retries=0)
                    for _ in range(min(ENQUEUE_BATCH, jobs - start))
                ]
                transport.enqueue(batch)
        finally:
            transport.close()
        with psycopg.connect(self.round_url, autocommit=True) as conn:
            # Fresh statistics and visibility map: neither the planner nor autovacuum starts cold mid-run.
            conn.execute("vacuum analyze public.coding_jobs")
            pending = _scalar(conn, "select count(*) from public.coding_jobs where status = 'pending'")
        if pending != jobs:
            raise BenchError(f"pre-loaded {pending} pending jobs, expected {jobs}")
        env = {DATABASE_URL_ENV: self.round_url}
        if self.claim_ahead is not None:
            env[CLAIM_AHEAD_ENV] = str(self.claim_ahead)
        return env

    def verify(self, jobs: int) -> dict[str, Any]:
        with psycopg.connect(self.round_url, autocommit=True) as conn:
            statuses = _statuses(conn)
            calls = self._function_calls(conn)
        expected = {**self._history, "completed": self._history.get("completed", 0) + jobs}
        if statuses != expected:
            raise BenchError(f"expected {jobs} completed jobs besides the history, found {statuses}")
        if not calls:
            return {}
        claims = calls.get("claim_jobs", 0)
        return {
            "round_trips_per_job": sum(calls.values()) / jobs,
            "function_calls": calls,
            "jobs_per_claim": jobs / claims if claims else None,
        }

    def finish_round(self) -> None:
        if self.round_database is not None:
            self._drop(self.round_database)
            self.round_database = None

    def close(self) -> None:
        for name in sorted(self._created):
            self._drop(name)

    def _function_calls(self, conn: psycopg.Connection[Any]) -> dict[str, int]:
        """Calls of the worker's queue functions, once the stopped worker's backends have reported them."""
        deadline = time.monotonic() + STATS_FLUSH_TIMEOUT_S
        previous: dict[str, int] | None = None
        while True:
            conn.execute("select pg_stat_clear_snapshot()")
            rows = conn.execute(
                "select funcname, calls from pg_stat_user_functions where schemaname = 'public'"
                " and funcname = any(%s)",
                (list(WORKER_FUNCTIONS),),
            ).fetchall()
            calls = {str(name): int(n) for name, n in rows}
            # Backends report as they exit, which may trail the disconnect: wait for two equal reads.
            if (calls and calls == previous) or time.monotonic() >= deadline:
                return calls
            previous = calls
            time.sleep(0.2)

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_url, autocommit=True)

    def _create(self, name: str, *, template: str | None) -> str:
        self._drop(name)
        with self._admin() as conn:
            query = sql.SQL("create database {}").format(sql.Identifier(name))
            if template is not None:
                query = sql.SQL("{} template {}").format(query, sql.Identifier(template))
            conn.execute(query)
        self._created.add(name)
        info = psycopg.conninfo.conninfo_to_dict(self.admin_url)
        info["dbname"] = name
        return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items() if v is not None})

    def _drop(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        self._created.discard(name)


class RabbitmqTarget(Target):
    """Dramatiq's RabbitmqBroker: the reference the issue names."""

    name = "rabbitmq"
    label = "RabbitmqBroker"
    worker_module = "bench.rabbitmq_worker"

    def __init__(self, url: str = DEFAULT_RABBITMQ_URL) -> None:
        self.url = url
        self.broker: Any = None

    def setup(self) -> None:
        import pika.exceptions

        try:
            self._connect()
        except pika.exceptions.AMQPError as exc:
            raise BenchError(f"RabbitMQ at {self.url}: {exc!r}") from exc

    def _connect(self) -> None:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.close()
        self.broker = RabbitmqBroker(url=self.url)
        self.actor = declare_actor(self.broker)
        self.broker.flush_all()

    def prepare(self, round_no: int, jobs: int) -> dict[str, str]:
        # A fresh connection each round: pika's blocking connection answers no heartbeats while the harness
        # runs other rows, and the server drops it after a few minutes of that.
        self._connect()
        # Dramatiq's own send path (no publisher confirms by default), the way a producer would pre-load it.
        for _ in range(jobs):
            self.actor.send()
        _wait_for(lambda: self.broker.get_queue_message_counts(QUEUE_NAME)[0], jobs, "RabbitMQ queue depth")
        return {RABBITMQ_URL_ENV: self.url}

    def verify(self, jobs: int) -> dict[str, Any]:
        # Unacked messages go back to the queue when the worker's connection closes: all zero means all acked.
        counts = self.broker.get_queue_message_counts(QUEUE_NAME)
        if counts != (0, 0, 0):
            raise BenchError(
                f"RabbitMQ queue, delay queue, dead letters after the round: {counts}, expected zeros"
            )
        return {}

    def close(self) -> None:
        if self.broker is not None:
            for name in (QUEUE_NAME, f"{QUEUE_NAME}.DQ", f"{QUEUE_NAME}.XQ"):
                self.broker.channel.queue_delete(name)
            self.broker.close()


class RedisTarget(Target):
    """Dramatiq's RedisBroker: a second reference."""

    name = "redis"
    label = "RedisBroker"
    worker_module = "bench.redis_worker"

    def __init__(self, url: str = DEFAULT_REDIS_URL) -> None:
        self.url = url
        self.broker: Any = None

    def setup(self) -> None:
        import redis.exceptions
        from dramatiq.brokers.redis import RedisBroker

        self.broker = RedisBroker(url=self.url, namespace=REDIS_NAMESPACE)  # type: ignore[no-untyped-call]
        self.actor = declare_actor(self.broker)
        try:
            self.broker.flush_all()
        except redis.exceptions.RedisError as exc:
            raise BenchError(f"Redis at {self.url}: {exc!r}") from exc

    def prepare(self, round_no: int, jobs: int) -> dict[str, str]:
        self.broker.flush_all()
        for _ in range(jobs):
            self.actor.send()
        _wait_for(lambda: self.broker.do_qsize(QUEUE_NAME), jobs, "Redis queue size")
        return {REDIS_URL_ENV: self.url}

    def verify(self, jobs: int) -> dict[str, Any]:
        size = self.broker.do_qsize(QUEUE_NAME)
        if size != 0:
            raise BenchError(f"Redis queue size after the round: {size}, expected 0")
        return {}

    def close(self) -> None:
        if self.broker is not None:
            # Heartbeats and ack sets outlive a flush; every key under the benchmark's namespace is ours.
            for key in self.broker.client.scan_iter(match=f"{REDIS_NAMESPACE}:*"):
                self.broker.client.delete(key)
            self.broker.close()


def _wait_for(read: Any, expected: int, what: str) -> None:
    deadline = time.monotonic() + PRELOAD_SETTLE_TIMEOUT_S
    while (seen := read()) != expected:
        if time.monotonic() >= deadline:
            raise BenchError(f"{what} is {seen} after pre-loading, expected {expected}")
        time.sleep(0.1)


def _statuses(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute("select status::text, count(*) from public.coding_jobs group by 1").fetchall()
    return {str(status): int(n) for status, n in rows}


def _scalar(conn: psycopg.Connection[Any], query: str) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def _noop_message() -> Message[Any]:
    return Message(queue_name=QUEUE_NAME, actor_name=ACTOR_NAME, args=(), kwargs={}, options={})
