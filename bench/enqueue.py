"""Producer-side rates: `send()` one job per call, a batch per call; the same for the floor and RabbitMQ.

Each producer runs in the harness process on a connection of its own and warms up first (connection, prepared
statements). The comparison alternates between them in short blocks (BLOCK_S of sends each, every producer in
turn), so a busy moment on a shared machine slows them alike; a producer's rate is the median of its blocks.
Producers build their messages inside the timed loop, as a real one does.
"""

from __future__ import annotations

import abc
import statistics
import time
import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench.floor import FloorProducer
from bench.noop_actors import ACTOR_NAME, QUEUE_NAME, declare_actor
from broker.broker import SupabaseBroker
from broker.postgres import PostgresTransport

#: Sends before the clock starts.
WARM_UP = 50
#: Messages per `enqueue_many` call in the batch measurement.
BATCH_SIZE = 1_000
#: Blocks per producer and round, and the jobs of one block (a batch producer sends BATCH_BLOCKS_FACTOR times
#: as many per block).
BLOCKS = 10
PLAIN_INSERT_SQL = (
    "insert into public.coding_jobs (id, queue_name, actor_name, args, kwargs, max_retries)"
    " values (%s, %s, %s, %s, %s, 0)"
)


class Producer(abc.ABC):
    """One way of putting jobs into a queue."""

    @abc.abstractmethod
    def send(self) -> int:
        """Send one call's worth of jobs; returns how many."""

    def close(self) -> None:  # noqa: B027 - most have something to close, not all
        """Release the connection."""

    def warm_up(self) -> None:
        for _ in range(WARM_UP):
            self.send()

    def block(self, jobs: int) -> float:
        """Jobs/s over one block of at least `jobs` jobs."""
        started = time.perf_counter()
        done = 0
        while done < jobs:
            done += self.send()
        return done / (time.perf_counter() - started)


class FloorSends(Producer):
    """INSERT + pg_notify per job into the floor's own table (bench/floor.py)."""

    def __init__(self, url: str) -> None:
        self.producer = FloorProducer(url)

    def send(self) -> int:
        self.producer.send({"args": [], "kwargs": {}, "options": {}})
        return 1

    def close(self) -> None:
        self.producer.close()


class PlainInserts(Producer):
    """A hand-written producer of this queue: one INSERT into coding_jobs per job (its trigger rings)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)

    def send(self) -> int:
        self.conn.execute(PLAIN_INSERT_SQL, (uuid.uuid4(), QUEUE_NAME, ACTOR_NAME, Jsonb([]), Jsonb({})))
        return 1

    def close(self) -> None:
        self.conn.close()


class BrokerSends(Producer):
    """`actor.send()` through SupabaseBroker, one job per call."""

    def __init__(self, url: str) -> None:
        self.broker = SupabaseBroker(PostgresTransport(url, pool_size=1))
        self.actor = declare_actor(self.broker)

    def send(self) -> int:
        self.actor.send()
        return 1

    def close(self) -> None:
        self.broker.close()


class BrokerBatches(BrokerSends):
    """`broker.enqueue_many()` of BATCH_SIZE fresh messages per call."""

    def send(self) -> int:
        return len(self.broker.enqueue_many([self.actor.message() for _ in range(BATCH_SIZE)]))

    def warm_up(self) -> None:
        self.broker.enqueue_many([self.actor.message() for _ in range(WARM_UP)])


class RabbitmqSends(Producer):
    """`actor.send()` through Dramatiq's RabbitmqBroker (persistent messages, no publisher confirms)."""

    def __init__(self, url: str) -> None:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        self.broker: Any = RabbitmqBroker(url=url)
        self.actor = declare_actor(self.broker)

    def send(self) -> int:
        self.actor.send()
        return 1

    def close(self) -> None:
        self.broker.flush_all()
        self.broker.close()


def interleaved(
    producers: dict[str, Producer], jobs: dict[str, int], blocks: int = BLOCKS
) -> dict[str, float]:
    """Each producer's median jobs/s over `blocks` blocks, the producers taking turns block by block."""
    for producer in producers.values():
        producer.warm_up()
    rates: dict[str, list[float]] = {name: [] for name in producers}
    for _ in range(blocks):
        for name, producer in producers.items():
            rates[name].append(producer.block(max(1, jobs[name] // blocks)))
    return {name: statistics.median(values) for name, values in rates.items()}
