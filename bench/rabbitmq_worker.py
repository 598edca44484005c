"""`dramatiq bench.rabbitmq_worker`: the no-op actor on Dramatiq's own RabbitmqBroker, the reference.

Reads BENCH_RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672).
"""

from __future__ import annotations

import os

from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.environment import DEFAULT_RABBITMQ_URL, RABBITMQ_URL_ENV
from bench.noop_actors import declare

broker = RabbitmqBroker(url=os.environ.get(RABBITMQ_URL_ENV, DEFAULT_RABBITMQ_URL))
noop = declare(broker)
