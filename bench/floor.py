"""The floor: a job queue written by hand, as plain as PostgreSQL allows, to measure the broker against.

A table of its own (id, queue, payload, status, created_at, one partial index for pending rows), filled by one
`INSERT ... RETURNING` that also calls `pg_notify` in the same statement, from the same psycopg client the
broker uses. Its worker is one thread: LISTEN, then claim the oldest pending row with `UPDATE ... FOR UPDATE
SKIP LOCKED RETURNING`, run it, mark it done: two commits per job, like the broker's claim and ack. No leases,
no retries, no registry, no batching: what a queue costs with none of the guarantees.

`python -m bench.floor URL --pickup-port PORT` runs the worker for the pickup measurement (a job's payload
carries its send time, echoed to the harness like bench/stamp.py does); `--drain N` runs it until N jobs are
done and prints the rate.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

#: The notification channel of the floor's doorbell.
CHANNEL = "bench_floor"
CREATE_SQL = """
create table if not exists bench_floor_jobs (
  id uuid primary key,
  queue_name text not null,
  payload jsonb not null,
  status text not null default 'pending',
  created_at timestamptz not null default now()
);
create index if not exists bench_floor_jobs_pending_idx on bench_floor_jobs (queue_name, created_at)
  where status = 'pending';
"""
INSERT_SQL = (
    "with job as (insert into bench_floor_jobs (id, queue_name, payload) values (%s, %s, %s)"
    " returning queue_name) select pg_notify('" + CHANNEL + "', queue_name) from job"
)
CLAIM_SQL = """
update bench_floor_jobs set status = 'running'
 where id = (select id from bench_floor_jobs where status = 'pending' and queue_name = %s
              order by created_at limit 1 for update skip locked)
returning id, payload
"""
DONE_SQL = "update bench_floor_jobs set status = 'done' where id = %s"
#: The queue the floor's jobs go to.
QUEUE = "floor"


def create(conn: psycopg.Connection[Any]) -> None:
    conn.execute(CREATE_SQL)


class FloorProducer:
    """Sends floor jobs: one INSERT with pg_notify per job, on one autocommit connection."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        create(self.conn)

    def send(self, payload: dict[str, Any]) -> None:
        self.conn.execute(INSERT_SQL, (uuid.uuid4(), QUEUE, Jsonb(payload))).fetchall()

    def close(self) -> None:
        self.conn.close()


def run_worker(url: str, *, pickup_port: int | None, drain: int | None) -> float | None:
    """The floor's worker loop; returns jobs/s with `drain`, else runs until killed."""
    listener = psycopg.connect(url, autocommit=True)
    conn = psycopg.connect(url, autocommit=True)
    create(conn)
    listener.execute(f"listen {CHANNEL}")
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    done, first = 0, 0.0
    while drain is None or done < drain:
        row = conn.execute(CLAIM_SQL, (QUEUE,)).fetchone()
        if row is None:
            for _ in listener.notifies(timeout=1.0, stop_after=1):
                pass
            continue
        job_id, payload = row
        if pickup_port is not None and "sent_at" in payload:
            started = time.monotonic()
            echo.sendto(f"{payload['sent_at']!r} {started!r}".encode(), ("127.0.0.1", pickup_port))
        conn.execute(DONE_SQL, (job_id,))
        done += 1
        if done == 1:
            first = time.perf_counter()
    return (done - 1) / (time.perf_counter() - first) if drain else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--pickup-port", type=int)
    parser.add_argument("--drain", type=int)
    args = parser.parse_args(argv)
    rate = run_worker(args.url, pickup_port=args.pickup_port, drain=args.drain)
    if rate is not None:
        print(f"{rate:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
