"""`dramatiq bench.supabase_worker`: the no-op actor on our SupabaseBroker over direct PostgreSQL.

Reads BENCH_DATABASE_URL (required), BENCH_THREADS and BENCH_POLL_INTERVAL_MS. Benchmark code may read the
environment; the service never does outside its settings.
"""

from __future__ import annotations

import os

from bench.environment import DATABASE_URL_ENV, DEFAULT_THREADS, POLL_INTERVAL_ENV, THREADS_ENV
from bench.noop_actors import declare
from broker.broker import SupabaseBroker
from broker.defaults import DEFAULT_POLL_INTERVAL_MS
from broker.postgres import PostgresTransport
from service.budget import worker_pool_size

_threads = int(os.environ.get(THREADS_ENV, DEFAULT_THREADS))
# The pool the service itself builds for this many threads (service/budget.py).
broker = SupabaseBroker(
    PostgresTransport(os.environ[DATABASE_URL_ENV], pool_size=worker_pool_size(_threads)),
    poll_interval_ms=int(os.environ.get(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL_MS)),
)
noop = declare(broker)
