"""The Python side names the same job statuses as the database's enum."""

from __future__ import annotations

from broker.broker import ACTIVE_STATUSES
from broker.operator_records import FINISHED_STATUSES, JOB_STATUSES
from health.monitor import STATUSES
from tests.support.brokers import Db


def database_statuses(db: Db) -> list[str]:
    row = db.execute("select enum_range(null::public.job_status)::text[] as statuses").fetchone()
    assert row is not None
    return list(row["statuses"])


def test_the_statuses_python_knows_are_the_database_enum(db: Db) -> None:
    statuses = database_statuses(db)
    assert statuses == ["pending", "processing", "completed", "failed", "cancelled"]
    assert set(STATUSES) == set(statuses)
    assert tuple(statuses) == JOB_STATUSES
    # join() waits while a queue has jobs in these statuses: the ones that are not final
    assert set(statuses) - FINISHED_STATUSES == ACTIVE_STATUSES
