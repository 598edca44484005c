"""Unique jobs (issue 11): an idempotency key, through the Edge Function's PostgREST insert and send()."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import httpx
import pytest

from broker.broker import SupabaseBroker
from tests.support.brokers import Db, job
from tests.support.postgrest import PostgrestEndpoint, running_postgrest

#: What the Edge Function sends to get the existing job back when its key is taken.
UPSERT_ON_KEY = {"Prefer": "resolution=merge-duplicates, return=representation"}


@pytest.fixture
def endpoint(database_url: str) -> Iterator[PostgrestEndpoint]:
    with running_postgrest(database_url) as running:
        yield running


def post_job(endpoint: PostgrestEndpoint, row: dict[str, Any], *, upsert: bool = True) -> httpx.Response:
    """The Edge Function's insert, with the service role key, as supabase-js sends it."""
    headers = {"apikey": endpoint.service_role_key, "Authorization": f"Bearer {endpoint.service_role_key}"}
    headers |= UPSERT_ON_KEY if upsert else {"Prefer": "return=representation"}
    query = "?on_conflict=idempotency_key" if upsert else ""
    return httpx.post(f"{endpoint.url}/rest/v1/coding_jobs{query}", json=row, headers=headers, timeout=10)


def edge_row(key: str, prompt: str = "add a button") -> dict[str, Any]:
    user = "6f1a3e52-6c1b-4bd6-9a70-3d3c3b2a1f00"
    return {"user_id": user, "prompt": prompt, "priority": 10, "idempotency_key": key}


def test_the_edge_function_gets_the_pending_or_running_job_back_for_a_repeated_key(
    db: Db, endpoint: PostgrestEndpoint
) -> None:
    # Given a job the Edge Function inserted with a key
    first = post_job(endpoint, edge_row("req-1"))
    assert first.status_code == 201, first.text
    [created] = first.json()

    # When the same request comes again, while the job is pending and while it runs
    again = post_job(endpoint, edge_row("req-1"))
    db.execute(
        "update public.coding_jobs set status = 'processing', claim_token = gen_random_uuid(),"
        " lease_expires_at = now() + interval '1 minute' where id = %s",
        (created["id"],),
    )
    while_running = post_job(endpoint, edge_row("req-1"))

    # Then each answer is that job, and there is one row
    assert [r.status_code for r in (again, while_running)] == [201, 201]
    assert again.json()[0]["id"] == while_running.json()[0]["id"] == created["id"]
    assert while_running.json()[0]["status"] == "processing"
    assert db.execute("select count(*) as n from public.coding_jobs").fetchone() == {"n": 1}


def test_a_key_reused_with_other_values_or_without_the_upsert_is_a_conflict(
    db: Db, endpoint: PostgrestEndpoint
) -> None:
    assert post_job(endpoint, edge_row("req-2")).status_code == 201

    other_prompt = post_job(endpoint, edge_row("req-2", prompt="delete everything"))
    plain_insert = post_job(endpoint, edge_row("req-2"), upsert=False)

    assert other_prompt.status_code == 409 and other_prompt.json()["code"] == "23505"
    assert plain_insert.status_code == 409 and plain_insert.json()["code"] == "23505"
    assert db.execute("select prompt from public.coding_jobs").fetchall() == [{"prompt": "add a button"}]


def test_a_finished_job_lets_go_of_its_key(db: Db, endpoint: PostgrestEndpoint) -> None:
    [first] = post_job(endpoint, edge_row("req-3")).json()
    db.execute("update public.coding_jobs set status = 'completed' where id = %s", (first["id"],))

    [second] = post_job(endpoint, edge_row("req-3")).json()

    assert second["id"] != first["id"]
    assert job(db, first["id"])["idempotency_key"] is None
    assert job(db, second["id"])["idempotency_key"] == "req-3"


def test_a_python_producer_gets_the_existing_job_for_a_repeated_key(db: Db, broker: SupabaseBroker) -> None:
    @dramatiq.actor(broker=broker, queue_name="unique")
    def report(day: str) -> None: ...

    # Given a message sent with a key
    first = report.send_with_options(args=("mon",), idempotency_key="report:mon")

    # When it is sent again (a new message), and once more after the job completed
    again = report.send_with_options(args=("mon",), idempotency_key="report:mon")
    db.execute("update public.coding_jobs set status = 'completed' where id = %s", (first.message_id,))
    later = report.send_with_options(args=("mon",), idempotency_key="report:mon")

    # Then the repeat names the first job and adds no row; after completion the key makes a new job
    assert again.message_id == first.message_id
    assert later.message_id != first.message_id
    rows = db.execute("select id::text, idempotency_key, options from public.coding_jobs order by created_at")
    assert [(r["id"], r["idempotency_key"]) for r in rows] == [
        (first.message_id, None),
        (later.message_id, "report:mon"),
    ]
    assert all("idempotency_key" not in r["options"] for r in rows.fetchall())


def test_a_key_must_be_a_short_string(broker: SupabaseBroker) -> None:
    @dramatiq.actor(broker=broker)
    def task() -> None: ...

    with pytest.raises(ValueError, match="idempotency_key"):
        task.send_with_options(idempotency_key="x" * 501)
    with pytest.raises(ValueError, match="idempotency_key"):
        task.send_with_options(idempotency_key=42)
    assert str(uuid.uuid4())  # a plain send without a key still works
    task.send()


def test_keys_hold_in_batches_too(db: Db, broker: SupabaseBroker) -> None:
    @dramatiq.actor(broker=broker, queue_name="unique")
    def report(day: str) -> None: ...

    # Given a job that holds a key
    first = report.send_with_options(args=("mon",), idempotency_key="report:mon")

    # When a batch of one repeats that key, and a batch mixes a repeat, a new key and no key
    [alone] = broker.enqueue_many([report.message_with_options(args=("mon",), idempotency_key="report:mon")])
    with broker.batched_sends():
        # (a send inside the block returns its message before the block sends it, so only the rows tell)
        report.send_with_options(args=("mon",), idempotency_key="report:mon")
        report.send_with_options(args=("tue",), idempotency_key="report:tue")
        report.send("wed")
    mixed = broker.enqueue_many(
        [
            report.message_with_options(args=("mon",), idempotency_key="report:mon"),
            report.message_with_options(args=("thu",), idempotency_key="report:thu"),
            report.message(("fri",)),
        ]
    )

    # Then every repeat names the job holding the key, and each new key is in its column
    assert alone.message_id == first.message_id == mixed[0].message_id
    rows = db.execute("select id::text, idempotency_key from public.coding_jobs").fetchall()
    keys = {r["idempotency_key"]: r["id"] for r in rows}
    assert keys.get("report:mon") == first.message_id
    assert keys.get("report:thu") == mixed[1].message_id
    assert "report:tue" in keys
    assert len(rows) == 5  # mon, tue, wed, thu, fri: no repeat of mon made a row
