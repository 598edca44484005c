"""What the harness hands the worker processes through their environment: names and defaults.

Kept apart from the worker modules because importing one of those builds its broker.
"""

from __future__ import annotations

DATABASE_URL_ENV = "BENCH_DATABASE_URL"
RABBITMQ_URL_ENV = "BENCH_RABBITMQ_URL"
REDIS_URL_ENV = "BENCH_REDIS_URL"
THREADS_ENV = "BENCH_THREADS"
POLL_INTERVAL_ENV = "BENCH_POLL_INTERVAL_MS"
EXPECTED_JOBS_ENV = "BENCH_EXPECTED_JOBS"
RESULT_FILE_ENV = "BENCH_RESULT_FILE"

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Redis keys of their own, so the benchmark's flushes never touch another program's queues.
REDIS_NAMESPACE = "bench-throughput"
#: Worker threads per process unless BENCH_THREADS says otherwise (the CLI's --threads must agree).
DEFAULT_THREADS = 8
#: UDP port on 127.0.0.1 where the stamp actor reports pickups.
PICKUP_PORT_ENV = "BENCH_PICKUP_PORT"
#: CLAIM_AHEAD_JOBS for our worker: unset keeps Dramatiq's prefetch (twice the threads).
CLAIM_AHEAD_ENV = "BENCH_CLAIM_AHEAD"
#: Worker processes of a run (the stopwatch's files differ with more than one).
PROCESSES_ENV = "BENCH_PROCESSES"
