"""`dramatiq bench.supabase_worker`: the no-op actor on our SupabaseBroker over direct PostgreSQL.

Reads BENCH_DATABASE_URL (required), BENCH_THREADS, BENCH_POLL_INTERVAL_MS and BENCH_CLAIM_AHEAD (unset:
Dramatiq's prefetch, twice the threads; a number: the service's CLAIM_AHEAD_JOBS, with MAX_CONCURRENT_JOBS
equal to the threads, as `service.launch` runs it). Benchmark code may read the environment; the service
never does outside its settings.
"""

from __future__ import annotations

import os

from bench.environment import (
    CLAIM_AHEAD_ENV,
    DATABASE_URL_ENV,
    DEFAULT_THREADS,
    POLL_INTERVAL_ENV,
    THREADS_ENV,
)
from bench.noop_actors import declare
from broker.broker import SupabaseBroker
from broker.defaults import DEFAULT_POLL_INTERVAL_MS
from broker.postgres import PostgresTransport
from service.budget import worker_pool_size

_threads = int(os.environ.get(THREADS_ENV, DEFAULT_THREADS))
_claim_ahead = os.environ.get(CLAIM_AHEAD_ENV)
# The pool the service itself builds for this many threads (service/budget.py).
broker = SupabaseBroker(
    PostgresTransport(os.environ[DATABASE_URL_ENV], pool_size=worker_pool_size(_threads)),
    poll_interval_ms=int(os.environ.get(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL_MS)),
    claim_ahead=None if not _claim_ahead else int(_claim_ahead),
    concurrency=None if not _claim_ahead else _threads,
)
noop = declare(broker)
