"""Fair share (issue 11): per-user caps by plan, round-robin inside a tier, aging, over real PostgreSQL."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import defaultdict

import psycopg
from psycopg.rows import dict_row

from broker.transport import Transport
from tests.support.brokers import Db, wait_until

FREE, STARTER, PRO = 0, 5, 10
CAPS = {FREE: 1, STARTER: 2, PRO: 5}
#: Seconds the concurrency test keeps its claimers busy.
CLAIMING_S = 2.5


def add_jobs(db: Db, user: uuid.UUID | None, priority: int, count: int, *, age_s: float = 0.0) -> list[str]:
    """`count` jobs of one user inserted the Edge Function's way, made `age_s` seconds old."""
    rows = db.execute(
        "insert into public.coding_jobs (user_id, prompt, priority, created_at, run_at)"
        " select %s, 'p' || n, %s, now() - %s * interval '1 second' + n * interval '1 microsecond',"
        "        now() - %s * interval '1 second'"
        "   from generate_series(1, %s) n returning id::text",
        (user, priority, age_s, age_s, count),
    ).fetchall()
    return [str(row["id"]) for row in rows]


def register(db: Db, worker_id: str) -> str:
    db.execute("select public.register_worker(%s, 'heartbeat', 600000)", (worker_id,))
    return worker_id


def claim(db: Db, worker_id: str, limit: int) -> list[dict[str, object]]:
    return db.execute(
        "select id::text, user_id, priority, claim_token"
        " from public.claim_jobs(%s, 'default', %s, 60000, %s)",
        (worker_id, limit, uuid.uuid4()),
    ).fetchall()


def complete(db: Db, rows: list[dict[str, object]]) -> None:
    db.execute(
        "select public.complete_jobs(%s::uuid[], %s::uuid[])",
        ([r["id"] for r in rows], [r["claim_token"] for r in rows]),
    )


def test_caps_hold_exactly_while_many_workers_claim_at_once(db: Db, database_url: str) -> None:
    # Given three users on three plans with more jobs than their caps, and 8 claimers on their own connections
    users = {uuid.uuid4(): FREE, uuid.uuid4(): STARTER, uuid.uuid4(): PRO}
    for user, priority in users.items():
        add_jobs(db, user, priority, 30)
    add_jobs(db, None, PRO, 30)  # no user: not capped
    intervals: dict[uuid.UUID, list[tuple[float, float]]] = defaultdict(list)
    sampled: dict[uuid.UUID, int] = defaultdict(int)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def claimer(n: int) -> None:
        try:
            with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
                worker = register(conn, f"claimer-{n}")
                while not stop.is_set():
                    rows = claim(conn, worker, random.randint(1, 6))
                    started = time.monotonic()  # after the claim committed: inside the job's running time
                    time.sleep(random.uniform(0.002, 0.02))
                    ended = time.monotonic()  # before the completion commits
                    with lock:
                        for row in rows:
                            if row["user_id"] is not None:
                                intervals[row["user_id"]].append((started, ended))  # type: ignore[index]
                    if rows:
                        complete(conn, rows)
        except BaseException as exc:
            errors.append(exc)

    def sampler() -> None:
        with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
            while not stop.is_set():
                for row in conn.execute(
                    "select user_id, count(*) as n from public.coding_jobs"
                    " where status = 'processing' and user_id is not null group by user_id"
                ):
                    sampled[row["user_id"]] = max(sampled[row["user_id"]], int(row["n"]))

    # When they claim and complete for a while
    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    threads.append(threading.Thread(target=sampler))
    for thread in threads:
        thread.start()
    time.sleep(CLAIMING_S)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)

    # Then no user ever had more jobs running than the cap of their plan, and the caps were reached
    assert errors == []
    most = {user: max_overlap(spans) for user, spans in intervals.items()}
    assert all(most[user] <= CAPS[priority] for user, priority in users.items()), (most, CAPS)
    assert all(sampled[user] <= CAPS[priority] for user, priority in users.items()), (sampled, CAPS)
    # (reached as the claimers timed it or as the database showed it: a loaded machine can shrink the first's
    # windows until they no longer overlap, or let the sampler miss the moment; both missing it is a failure)
    pro = next(u for u, p in users.items() if p == PRO)
    assert max(most[pro], sampled[pro]) == CAPS[PRO], (most, sampled)


def max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_a_user_with_200_jobs_and_a_user_with_one_start_in_the_same_claim(db: Db) -> None:
    # Given a Pro user with 200 older jobs and another Pro user with one
    heavy, light = uuid.uuid4(), uuid.uuid4()
    add_jobs(db, heavy, PRO, 200, age_s=5)
    [light_job] = add_jobs(db, light, PRO, 1)
    worker = register(db, "w")

    # When one claim asks for 8 jobs
    rows = claim(db, worker, 8)

    # Then both users start: the heavy one up to its cap, the light one's job too, before any of the rest
    assert sum(row["user_id"] == heavy for row in rows) == CAPS[PRO]
    assert light_job in [row["id"] for row in rows]

    # And without caps, the claim goes round the users: the light user's job comes second
    db.execute("select public.set_plan_limit('pro', 10, null)")
    db.execute(
        "update public.coding_jobs set status = 'pending', claim_token = null, lease_expires_at = null"
    )
    rows = claim(db, worker, 3)
    assert [row["user_id"] for row in rows] == [heavy, light, heavy]


def test_tiers_order_claims_and_aging_lifts_a_waiting_free_job_into_the_top_tier(db: Db) -> None:
    # Given a steady backlog of Pro jobs of many users and one Free job, with a 100 ms aging step
    db.execute("select public.set_fairness(true, 100)")
    worker = register(db, "w")
    for _ in range(20):
        add_jobs(db, uuid.uuid4(), PRO, 1)
    [free_job] = add_jobs(db, uuid.uuid4(), FREE, 1)
    started = time.monotonic()

    # When workers keep claiming one job at a time while new Pro jobs keep arriving
    def free_job_claimed() -> bool:
        add_jobs(db, uuid.uuid4(), PRO, 1)
        rows = claim(db, worker, 1)
        complete(db, rows)
        return any(row["id"] == free_job for row in rows)

    wait_until(free_job_claimed, timeout_s=5, describe="the Free job to be claimed")
    waited_s = time.monotonic() - started

    # Then it waited behind the Pro jobs, but no longer than ten aging steps (plus one claim's time)
    assert 0.9 <= waited_s <= 10 * 0.1 + 0.5, waited_s


def test_jobs_without_a_user_are_not_capped_and_the_switch_turns_it_all_off(db: Db) -> None:
    user = uuid.uuid4()
    add_jobs(db, None, FREE, 3)
    add_jobs(db, user, FREE, 3, age_s=1)
    worker = register(db, "w")

    assert sorted(str(row["user_id"]) for row in claim(db, worker, 10)) == sorted([str(user)] + ["None"] * 3)

    db.execute("select public.set_fairness(false)")
    assert len(claim(db, worker, 10)) == 2  # the user's other two: no cap


def test_a_freed_slot_rings_the_queue_of_the_capped_user(db: Db, database_url: str) -> None:
    # Given a Free user with one job running and one waiting for the cap
    user = uuid.uuid4()
    add_jobs(db, user, FREE, 2)
    worker = register(db, "w")
    [running] = claim(db, worker, 5)
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("listen coding_jobs")
        # When the running job completes
        complete(db, [running])
        # Then the doorbell rings for its queue, so a consumer claims the waiting job at once
        notes = [json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
    assert [note["queue"] for note in notes] == ["default"]
    assert len(claim(db, worker, 5)) == 1


def test_the_operator_functions_show_and_change_the_caps(db: Db) -> None:
    limits = db.execute("select plan, priority, max_priority, max_running from public.get_plan_limits()")
    assert [tuple(row.values()) for row in limits] == [
        ("free", 0, 4, 1),
        ("starter", 5, 9, 2),
        ("pro", 10, 10, 5),
    ]
    db.execute("select public.set_plan_limit('enterprise', 10, 20)")
    db.execute("select public.set_plan_limit('pro', 8, 5)")
    plans = db.execute("select plan, priority, max_running from public.get_plan_limits()").fetchall()
    assert [tuple(row.values()) for row in plans][-2:] == [("pro", 8, 5), ("enterprise", 10, 20)]

    user = uuid.uuid4()
    add_jobs(db, user, FREE, 3)
    claim(db, register(db, "w"), 5)
    stats = {row["plan"]: row for row in db.execute("select * from public.get_fairness_stats()")}
    assert stats["free"]["running_jobs"] == 1
    assert stats["free"]["users_at_cap"] == 1
    assert stats["free"]["capped_pending_jobs"] == 2
    assert stats["free"]["oldest_pending_at"] is not None


def test_claims_over_either_transport_respect_the_caps(db: Db, transport: Transport) -> None:
    user = uuid.uuid4()
    add_jobs(db, user, FREE, 3)
    register(db, "t")

    claimed = transport.claim("t", "default", 5, 60_000, str(uuid.uuid4()))

    assert [job.kwargs.get("user_id") for job in claimed] == [str(user)]
