"""Dramatiq's result and rate-limiter backends on the queue's PostgreSQL (migration 20261128000150_results).

Results serve `message.get_result()`, `group.wait()` and `group.get_results()`; the rate-limiter backend
serves Dramatiq's rate limiters and the barriers of `GroupCallbacks` (group completion callbacks). Both speak
only through the migration's SQL functions, over a direct (or pooled) PostgreSQL connection.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from dramatiq.encoder import Encoder, PickleEncoder
from dramatiq.logging import get_logger
from dramatiq.message import Message
from dramatiq.rate_limits import RateLimiterBackend
from dramatiq.results import ResultBackend, ResultMissing, ResultTimeout
from dramatiq.results.backend import DEFAULT_TIMEOUT, Missing, MResult, Result
from psycopg_pool import ConnectionPool

from broker.errors import ConnectionClosed, QueueError
from broker.function_pool import DEFAULT_POOL_SIZE, DEFAULT_POOL_TIMEOUT_S, FunctionPool

#: Seconds before the second look of a blocking wait; later looks come twice as late, up to the maximum.
FIRST_POLL_INTERVAL_S = 0.02
#: Seconds between looks of a long blocking wait: one primary-key lookup per waiter per interval.
MAX_POLL_INTERVAL_S = 0.25
#: The largest counter value (PostgreSQL's bigint): no bound.
MAX_COUNTER = 2**63 - 1
#: Seconds between purges of expired rows; the first store after the interval runs one.
PURGE_INTERVAL_S = 300.0


def _poll(look: Callable[[], Any], timeout_s: float | None) -> Any:
    """look() until it returns something other than Missing, for at most timeout_s (None: no deadline)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    interval = FIRST_POLL_INTERVAL_S
    while (found := look()) is Missing:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return Missing
        time.sleep(interval if remaining is None else min(interval, remaining))
        interval = min(interval * 2, MAX_POLL_INTERVAL_S)
    return found


class PostgresResultBackend(ResultBackend):
    """Actor results in `public.queue_results`, for `Results(backend=...)`.

    Blocking gets poll the row (20 ms, doubling to 250 ms) rather than LISTEN: polling works through
    transaction-mode poolers and needs no connection per waiter. The encoder must write JSON (the default
    does); results are stored as jsonb.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        pool: ConnectionPool[Any] | None = None,
        namespace: str = "dramatiq-results",
        encoder: Encoder | None = None,
        use_namespace_prefix_keys: bool = False,
        pool_size: int = DEFAULT_POOL_SIZE,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
        prepared_statements: bool = False,
    ) -> None:
        super().__init__(
            namespace=namespace, encoder=encoder, use_namespace_prefix_keys=use_namespace_prefix_keys
        )
        if isinstance(self.encoder, PickleEncoder):
            raise ValueError("PostgresResultBackend stores results as jsonb: use an encoder that writes JSON")
        self.logger = get_logger(__name__, type(self))
        self.calls = FunctionPool(
            url,
            pool=pool,
            name="queue-worker-results",
            size=pool_size,
            timeout_s=pool_timeout_s,
            prepared_statements=prepared_statements,
        )
        self._purge_lock = threading.Lock()
        self._next_purge = 0.0  # time.monotonic() after which a store also purges

    def get_result(self, message: Message[Any], *, block: bool = False, timeout: int | None = None) -> Result:
        key = self.build_message_key(message)
        timeout_ms = DEFAULT_TIMEOUT if timeout is None else timeout
        result = _poll(lambda: self._get(key), timeout_ms / 1000 if block else 0)
        if result is Missing:
            raise ResultTimeout(message) if block else ResultMissing(message)
        return self.unwrap_result(result)  # type: ignore[no-untyped-call]

    def _get(self, message_key: str) -> MResult:
        document = self.calls.value(
            "select public.queue_get_result(%s)::text", (message_key,), idempotent=True
        )
        return Missing if document is None else self.encoder.decode(document.encode("utf-8"))

    def _store(self, message_key: str, result: Result, ttl: int) -> None:
        document = self.encoder.encode(result).decode("utf-8")
        self.calls.value(
            "select public.queue_store_result(%s, %s::jsonb, %s)",
            (message_key, document, ttl),
            idempotent=True,
        )
        self._purge_now_and_then()

    def purge_expired(self) -> int:
        """Delete expired results and counters now; returns how many rows went."""
        return int(self.calls.value("select public.queue_purge_expired_results()", (), idempotent=True))

    def _purge_now_and_then(self) -> None:
        with self._purge_lock:
            now = time.monotonic()
            if now < self._next_purge:
                return
            self._next_purge = now + PURGE_INTERVAL_S
        try:
            self.purge_expired()
        except (ConnectionClosed, QueueError) as exc:
            # The result is stored; a purge that fails now runs again after the next interval.
            self.logger.warning("Could not purge expired results: %s", exc)

    def close(self) -> None:
        """Release the backend's connections (nothing if it borrowed a pool)."""
        self.calls.close()


class PostgresRateLimiterBackend(RateLimiterBackend):
    """Counters in `public.queue_counters`, for Dramatiq's rate limiters and `GroupCallbacks(backend)`.

    Each method is one call of a SQL function that locks its keys, so every operation is atomic across
    threads and processes. Blocking barrier waits poll, like blocking result gets.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        pool: ConnectionPool[Any] | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
        prepared_statements: bool = False,
    ) -> None:
        self.calls = FunctionPool(
            url,
            pool=pool,
            name="queue-worker-rate-limits",
            size=pool_size,
            timeout_s=pool_timeout_s,
            prepared_statements=prepared_statements,
        )

    # None of the writes is retried after a lost connection: the lost call may have committed.
    def _write(self, query: str, params: Sequence[Any]) -> bool:
        return bool(self.calls.value(query, params, idempotent=False))

    def add(self, key: str, value: int, ttl: int) -> bool:
        return self._write("select public.queue_counter_add(%s, %s, %s)", (key, value, ttl))

    def incr(self, key: str, amount: int, maximum: int, ttl: int) -> bool:
        return self._write("select public.queue_counter_incr(%s, %s, %s, %s)", (key, amount, maximum, ttl))

    def decr(self, key: str, amount: int, minimum: int, ttl: int) -> bool:
        return self._write("select public.queue_counter_decr(%s, %s, %s, %s)", (key, amount, minimum, ttl))

    def incr_and_sum(
        self, key: str, keys: Callable[[], Iterable[str]], amount: int, maximum: int, ttl: int
    ) -> bool:
        return self._write(
            "select public.queue_counter_incr_and_sum(%s, %s::text[], %s, %s, %s)",
            (key, list(keys()), amount, maximum, ttl),
        )

    def wait(self, key: str, timeout: int | None) -> bool:
        """Wait for wait_notify(key) for at most `timeout` ms; None means no deadline, as in Redis."""

        def look() -> Any:
            value = self.calls.value("select public.queue_counter_get(%s)", (key,), idempotent=True)
            return Missing if value is None else value

        return _poll(look, None if timeout is None else timeout / 1000) is not Missing

    def wait_notify(self, key: str, ttl: int) -> None:
        # Like Redis's RPUSH + PEXPIRE: every notification counts and renews the key's lifetime.
        self._write("select public.queue_counter_incr(%s, 1, %s, %s)", (key, MAX_COUNTER, ttl))

    def close(self) -> None:
        """Release the backend's connections (nothing if it borrowed a pool)."""
        self.calls.close()
