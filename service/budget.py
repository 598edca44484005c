"""The connection budget of one container: how many database connections each of its processes may open.

The numbers WORKER_SERVICE.md's budget table is built from, in one place. A container is the dramatiq main
process (no connection), WORKER_PROCESSES worker processes and the health fork. Each worker process has one
pool and, when the database gives sessions of our own (a direct connection or a session-mode pooler), one
LISTEN connection; the health fork has one pooled connection. Behind a session-mode pooler every one of them
holds a server connection for as long as it is open, so these are the numbers that must fit the pooler's pool.
"""

from __future__ import annotations

#: Pooled connections of a worker process that runs one job at a time: the consumer's claim and the ack
#: flusher's batch may run at once; the lease keeper, a retry and a job's own sends take turns (calls take
#: milliseconds).
SINGLE_THREAD_WORKER_POOL = 2
#: With several threads, one more, so a job thread's call need not wait behind a claim and an ack. Measured
#: with bench/throughput.py (8 threads, no-op jobs): 3 connections did as well as 11 (the old threads + 3).
MULTI_THREAD_WORKER_POOL = 3
#: The LISTEN connection of a worker process, with sessions of our own only (none behind a transaction
#: pooler).
LISTEN_CONNECTIONS = 1
#: The health fork: /ready, /metrics and the queue monitor share one connection (one read at a time each).
HEALTH_POOL_SIZE = 1
#: The dashboard fork, with DASHBOARD_PORT set: its request threads share two connections (a page's reads
#: run one after another; a second serves an action or another tab meanwhile).
DASHBOARD_POOL_SIZE = 2
#: Connections a worker process opens for a moment at start, to tell sessions from a transaction pooler.
PROBE_CONNECTIONS = 2


def worker_pool_size(threads: int) -> int:
    """The pool of a worker process with `threads` worker threads (MAX_CONCURRENT_JOBS)."""
    return SINGLE_THREAD_WORKER_POOL if threads <= 1 else MULTI_THREAD_WORKER_POOL


def container_connections(
    processes: int, threads: int, *, listen: bool, pool_size: int | None = None, dashboard: bool = False
) -> int:
    """The most connections a running container holds: its worker processes' pools (and LISTEN), health, and
    the dashboard when it is on.

    `pool_size` is DATABASE_POOL_SIZE when set; `listen` is True with sessions of our own.
    """
    per_process = (pool_size or worker_pool_size(threads)) + (LISTEN_CONNECTIONS if listen else 0)
    return processes * per_process + HEALTH_POOL_SIZE + (DASHBOARD_POOL_SIZE if dashboard else 0)
