"""Test actors, usable in-process and by the real CLI: `dramatiq tasks tests.support.actors`.

In-process tests call `declare_test_actors(broker)` on a fresh broker of their own and never import `tasks`.
Under the CLI this module is imported after `tasks`, so it declares the actors on the global broker at import;
each run is then also written to `public.test_runs` in the queue's database (direct transport only), so a test
can count runs across processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Protocol

import dramatiq
import dramatiq.broker
import psycopg
import psycopg.errors
from dramatiq.middleware import CurrentMessage
from psycopg.types.json import Jsonb

from broker.broker import SupabaseBroker

#: The queue of the actors that are not on the default queue.
OTHER_QUEUE = "other"
#: Milliseconds of the smallest retry backoff of the failing actors: retries in tests stay quick.
MIN_BACKOFF_MS = 50
#: Milliseconds of the largest retry backoff of the failing actors.
MAX_BACKOFF_MS = 200
#: Milliseconds `overrun` may run before TimeLimit interrupts it.
OVERRUN_TIME_LIMIT_MS = 300
#: Seconds between checks of a sleeping actor, so an asynchronous exception (TimeLimitExceeded) lands quickly.
SLEEP_STEP_S = 0.02
#: The table runs are written to under the CLI.
RUNS_TABLE_DDL = """
create table if not exists public.test_runs (
  id bigint generated always as identity primary key,
  actor_name text not null,
  run_key text not null,
  event text not null,
  message_id text,
  retries integer,
  value jsonb,
  backend_pid integer not null default pg_backend_pid(),
  ran_at timestamptz not null default clock_timestamp()
)"""


class TransientError(Exception):
    """Raised by `picky`: the error its retry_when accepts."""


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """One thing a test actor did, with the message it did it for."""

    actor: str
    key: str
    #: "ran", "started", "finished" or "failed".
    event: str
    message_id: str | None
    retries: int | None
    #: The message's options as the actor saw them.
    options: dict[str, Any]
    value: Any = None
    at: float = dataclasses.field(default_factory=time.monotonic)


class RunLog(Protocol):
    """Where test actors record what they did."""

    def record(self, run: Run) -> None: ...


class Runs:
    """A thread-safe in-memory run log for in-process tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: list[Run] = []

    def record(self, run: Run) -> None:
        with self._lock:
            self._runs.append(run)

    def all(self) -> list[Run]:
        with self._lock:
            return list(self._runs)

    def of(self, actor: str, event: str | None = None) -> list[Run]:
        return [r for r in self.all() if r.actor == actor and (event is None or r.event == event)]

    def keys(self, actor: str, event: str | None = None) -> list[str]:
        """The keys an actor recorded, in the order it recorded them."""
        return [r.key for r in self.of(actor, event)]


class TableRuns:
    """A run log in `public.test_runs` of a database, shared by every process that writes to it."""

    def __init__(self, url: str) -> None:
        self._lock = threading.Lock()
        # No prepared statements: under the CLI `url` may lead through a transaction pooler.
        self._conn = psycopg.connect(
            url, autocommit=True, application_name="test-actors", prepare_threshold=None
        )
        create_runs_table(self._conn)

    def record(self, run: Run) -> None:
        with self._lock:
            self._conn.execute(
                "insert into public.test_runs (actor_name, run_key, event, message_id, retries, value)"
                " values (%s, %s, %s, %s, %s, %s)",
                (
                    run.actor,
                    run.key,
                    run.event,
                    run.message_id,
                    run.retries,
                    Jsonb(run.value),
                ),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def create_runs_table(conn: psycopg.Connection[Any]) -> None:
    """Create `public.test_runs`; processes starting together may race, and losing that race is fine."""
    with contextlib.suppress(
        psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable, psycopg.errors.DuplicateObject
    ):
        conn.execute(RUNS_TABLE_DDL)


def _sleep(duration_s: float) -> None:
    # Short sleeps in Python code: TimeLimit's asynchronous exception is only delivered between bytecodes.
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        time.sleep(min(SLEEP_STEP_S, max(deadline - time.monotonic(), 0)))


def declare_test_actors(broker: dramatiq.Broker, runs: RunLog | None = None) -> SimpleNamespace:
    """Declare the test actors on `broker`; returns them and their run log as attributes.

    The broker needs the CurrentMessage middleware: the actors record the message they ran for.
    """
    log: RunLog = runs if runs is not None else Runs()

    def note(actor: str, key: str, event: str = "ran", value: Any = None) -> int:
        message = CurrentMessage.get_current_message()
        options = dict(message.options) if message is not None else {}
        retries = options.get("retries")
        log.record(
            Run(
                actor=actor,
                key=key,
                event=event,
                message_id=message.message_id if message is not None else None,
                retries=retries,
                options=options,
                value=value,
            )
        )
        return int(retries or 0)

    def record(key: str) -> None:
        """Record one run."""
        note("record", key)

    def record_other(key: str) -> None:
        """Record one run, on the other queue."""
        note("record_other", key)

    def slow(key: str, duration_ms: int, fail: bool = False) -> None:
        """Record the start, sleep, record the end; then raise when asked to."""
        note("slow", key, "started")
        _sleep(duration_ms / 1000)
        note("slow", key, "finished")
        if fail:
            raise RuntimeError(f"slow {key} failed after {duration_ms} ms")

    def flaky(key: str, failures: int) -> None:
        """Fail the first `failures` attempts (counted by the row's retry_count), then succeed."""
        attempt = note("flaky", key, "started")
        if attempt < failures:
            note("flaky", key, "failed")
            raise RuntimeError(f"flaky {key} failed attempt {attempt + 1}")
        note("flaky", key, "ran")

    def fail_always(key: str) -> None:
        """Always fail."""
        note("fail_always", key, "failed")
        raise RuntimeError(f"boom {key}")

    def reject(key: str) -> None:
        """Raise the exception the actor declares in `throws`: fail at once, no retry."""
        note("reject", key, "failed")
        raise ValueError(f"rejected {key}")

    def picky(key: str) -> None:
        """Always raise TransientError; retry_when allows one retry only."""
        note("picky", key, "failed")
        raise TransientError(f"transient {key}")

    def overrun(key: str, duration_ms: int) -> None:
        """Run past the time limit."""
        note("overrun", key, "started")
        _sleep(duration_ms / 1000)
        note("overrun", key, "finished")

    def add(a: int, b: int) -> int:
        """Return a + b: the head of a pipeline."""
        note("add", f"{a}+{b}", value=a + b)
        return a + b

    def collect(key: str, value: Any) -> None:
        """Record the value a pipeline passed on."""
        note("collect", key, value=value)

    def succeeded(message_data: dict[str, Any], result: Any) -> None:
        """The on_success callback."""
        note("succeeded", str(message_data.get("message_id")), value=result)

    def failed(message_data: dict[str, Any], exception_data: dict[str, Any]) -> None:
        """The on_failure callback."""
        note("failed", str(message_data.get("message_id")), value=exception_data)

    backoff = {"min_backoff": MIN_BACKOFF_MS, "max_backoff": MAX_BACKOFF_MS}

    def declare(fn: Callable[..., Any], **options: Any) -> dramatiq.Actor[..., Any]:
        actor: dramatiq.Actor[..., Any] = dramatiq.actor(broker=broker, **options)(fn)
        return actor

    return SimpleNamespace(
        runs=log,
        record=declare(record),
        record_other=declare(record_other, queue_name=OTHER_QUEUE),
        slow=declare(slow, **backoff),
        flaky=declare(flaky, max_retries=3, **backoff),
        fail_always=declare(fail_always, max_retries=2, **backoff),
        reject=declare(reject, throws=(ValueError,), **backoff),
        picky=declare(
            picky,
            max_retries=5,
            retry_when=lambda retries, exc: isinstance(exc, TransientError) and retries < 1,
            **backoff,
        ),
        overrun=declare(overrun, time_limit=OVERRUN_TIME_LIMIT_MS, max_retries=1, **backoff),
        add=declare(add),
        collect=declare(collect),
        succeeded=declare(succeeded),
        failed=declare(failed),
    )


def _declare_on_global_broker() -> SimpleNamespace | None:
    # Read the global broker without dramatiq.get_broker(): with none set, that would build a RabbitMQ broker
    # and make it global as a side effect of importing this module in-process.
    current = dramatiq.broker.global_broker
    if not isinstance(current, SupabaseBroker):
        return None
    url = getattr(current.transport, "url", None)
    return declare_test_actors(current, TableRuns(url) if isinstance(url, str) else None)


#: The actors declared on the CLI's broker; None in-process, where tests declare their own.
declared = _declare_on_global_broker()
