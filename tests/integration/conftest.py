"""Fixtures of the broker suite: a transport per test, parametrised over every transport the broker runs on.

Tests that hold for any transport take `transport` (or `make_transport`, `make_broker`, `broker`, `actors`).
Tests of one transport's own mechanics (LISTEN, pg_terminate_backend) build it themselves, unparametrised.
To run the suite over another transport, add its name to TRANSPORT_KINDS and build it in `make_transport`
(`pool_size` is a hint a transport without a pool may ignore).

"rest" is the Supabase REST transport against a PostgREST-compatible endpoint over the test's database
(tests/support/postgrest.py), one per test, shared by the test's transports. Its Realtime doorbell is off
here: plain PostgreSQL has no `realtime.send`, so nothing would ever ring it, and the suite would only test
polling (every TEST_POLL_INTERVAL_MS) with an idle websocket beside it. The doorbell has tests of its own
(test_realtime.py, test_broker_rest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any

import dramatiq
import dramatiq.broker
import pytest

from broker.broker import SupabaseBroker
from broker.postgres import PostgresTransport
from broker.rest import RestTransport
from broker.transport import Transport
from tests.support.actors import declare_test_actors
from tests.support.brokers import BrokerFactory, Settlements, TransportFactory, build_broker
from tests.support.postgrest import PostgrestEndpoint, running_postgrest

#: The transports the broker suite runs over.
TRANSPORT_KINDS = ("postgres", "rest")
#: Pooled connections of a test transport: worker threads, the consumer, the lease keeper, producers.
TEST_POOL_SIZE = 6


@pytest.fixture(params=TRANSPORT_KINDS)
def transport_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_transport(transport_kind: str, database_url: str) -> Iterator[TransportFactory]:
    """Builds transports of this test's kind over the test's database; closes them all at teardown."""
    with ExitStack() as stack:
        endpoints: list[PostgrestEndpoint] = []

        def make(*, pool_size: int = TEST_POOL_SIZE) -> Transport:
            transport: Transport
            if transport_kind == "postgres":
                transport = PostgresTransport(database_url, pool_size=pool_size)
            elif transport_kind == "rest":
                if not endpoints:  # closed after every transport of the test (ExitStack unwinds in reverse)
                    endpoints.append(stack.enter_context(running_postgrest(database_url)))
                endpoint = endpoints[0]
                transport = RestTransport(
                    endpoint.url, endpoint.service_role_key, max_connections=pool_size, realtime=False
                )
            else:
                raise AssertionError(f"unknown transport kind {transport_kind!r}")
            stack.callback(transport.close)
            return transport

        yield make


@pytest.fixture
def transport(make_transport: TransportFactory) -> Transport:
    return make_transport()


@pytest.fixture
def make_broker(make_transport: TransportFactory) -> Iterator[BrokerFactory]:
    """Builds brokers, each on its own transport; closes them and restores the global broker at teardown."""
    previous = dramatiq.broker.global_broker
    with ExitStack() as stack:

        def make(*, pool_size: int = TEST_POOL_SIZE, **options: Any) -> SupabaseBroker:
            broker = build_broker(make_transport(pool_size=pool_size), **options)
            stack.callback(broker.close)
            return broker

        try:
            yield make
        finally:
            dramatiq.broker.global_broker = previous


@pytest.fixture
def broker(make_broker: BrokerFactory) -> SupabaseBroker:
    """A fresh broker over the test's database, also set as Dramatiq's global broker (pipelines, groups)."""
    broker = make_broker()
    dramatiq.set_broker(broker)
    return broker


@pytest.fixture
def settlements(broker: SupabaseBroker) -> Settlements:
    """What the worker does with each message of `broker`."""
    spy = Settlements()
    broker.add_middleware(spy)
    return spy


@pytest.fixture
def actors(broker: SupabaseBroker) -> SimpleNamespace:
    """The test actors, declared on `broker`, with their in-memory run log as `actors.runs`."""
    return declare_test_actors(broker)
