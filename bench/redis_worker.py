"""`dramatiq bench.redis_worker`: the no-op actor on Dramatiq's own RedisBroker, a second reference.

Reads BENCH_REDIS_URL (default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import os

from dramatiq.brokers.redis import RedisBroker

from bench.environment import DEFAULT_REDIS_URL, REDIS_NAMESPACE, REDIS_URL_ENV
from bench.noop_actors import declare

broker = RedisBroker(url=os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL), namespace=REDIS_NAMESPACE)  # type: ignore[no-untyped-call]
noop = declare(broker)
