"""A worker registers once at start-up: no heartbeat sent before its registration calls it dropped."""

from __future__ import annotations

import logging

import pytest

from tests.support.actors import declare_test_actors
from tests.support.brokers import BrokerFactory, Db, running_worker, wait_for_all

#: Seconds the start-up's jobs may take.
SETTLE_TIMEOUT_S = 10
#: Enough jobs to keep the worker up past several heartbeats' replies.
JOBS = 20


@pytest.mark.parametrize("start", range(3))
def test_a_starting_worker_is_not_told_the_registry_dropped_it(
    make_broker: BrokerFactory, db: Db, caplog: pytest.LogCaptureFixture, start: int
) -> None:
    caplog.set_level(logging.INFO)
    broker = make_broker(worker_id=f"starting-{start}")
    actors = declare_test_actors(broker)
    with running_worker(broker, threads=2):
        sent = [actors.record.send(f"job-{i}") for i in range(JOBS)]
        wait_for_all(db, [m.message_id for m in sent], "completed", SETTLE_TIMEOUT_S)
    dropped = [r.getMessage() for r in caplog.records if "registry dropped" in r.getMessage()]
    assert dropped == []
