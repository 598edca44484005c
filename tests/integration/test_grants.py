"""Who may do what: the API roles against the queue's functions and table, as Supabase runs them."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql
from psycopg.errors import InsufficientPrivilege

Connection = psycopg.Connection[dict[str, object]]

#: The queue's API: the functions a worker, the Edge Function or an operator calls.
QUEUE_FUNCTIONS = {
    "enqueue_jobs",
    "claim_jobs",
    "claim_next_job",
    "complete_job",
    "retry_job",
    "dead_letter_job",
    "fail_job",
    "release_jobs",
    "extend_leases",
    "rerun_failed_jobs",
    "purge_queue",
    "get_queue_stats",
    # the operator's (issue 8)
    "cancel_jobs",
    "cancel_held_jobs",
    "list_jobs",
    "get_job",
    "retry_jobs",
    "pause_queue",
    "resume_queue",
    "get_paused_queues",
    "prune_jobs",
    "get_actor_stats",
    "get_queue_history",
    "get_workers",
}
#: Functions a signed-in user calls through PostgREST with their own JWT; they check auth.uid() themselves.
USER_FUNCTIONS = {"cancel_my_job"}
#: The job statuses, in the database's order; a Python enum of them must list the same.
JOB_STATUSES = ["pending", "processing", "completed", "failed", "cancelled"]
PUBLIC_ROLES = ("anon", "authenticated")


@dataclass(frozen=True)
class Function:
    oid: int
    name: str
    #: The argument types as the catalog spells them (format_type), in order.
    arg_types: tuple[str, ...]
    is_trigger: bool

    def call(self) -> sql.Composed:
        """A call with every argument null: enough to reach the privilege check, harmless past it.

        Each null is a typed scalar subquery, not a constant: the planner folds a strict function called with
        a null constant into null before the executor checks the EXECUTE privilege.
        """
        nulls = [sql.SQL("(select null::{})").format(sql.SQL(arg_type)) for arg_type in self.arg_types]
        return sql.SQL("select {}({})").format(sql.Identifier("public", self.name), sql.SQL(", ").join(nulls))


def public_functions(db: Connection) -> list[Function]:
    """Every function the migrations created in `public`, trigger functions included."""
    rows = db.execute(
        """
        select p.oid::int8 as oid, p.proname as name,
               array(select format_type(a.type, null)
                       from unnest(p.proargtypes) with ordinality as a(type, position)
                      order by a.position) as arg_types,
               p.prorettype = 'trigger'::regtype as is_trigger
          from pg_proc p
         where p.pronamespace = 'public'::regnamespace
         order by p.proname
        """
    ).fetchall()
    functions = [
        Function(row["oid"], str(row["name"]), tuple(row["arg_types"]), bool(row["is_trigger"]))  # type: ignore[arg-type]
        for row in rows
    ]
    assert {function.name for function in functions} >= QUEUE_FUNCTIONS
    return functions


def run_as(db: Connection, role: str, statement: sql.Composed | str) -> None:
    """Run one statement as `role` in a transaction of its own, rolled back on error."""
    with db.transaction():
        db.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
        db.execute(statement)


def insert_job(db: Connection, user_id: uuid.UUID | None) -> uuid.UUID:
    row = db.execute(
        "insert into public.coding_jobs (user_id, prompt) values (%s, 'hello') returning id", (user_id,)
    ).fetchone()
    assert row is not None
    return row["id"]  # type: ignore[return-value]


@pytest.mark.parametrize("role", PUBLIC_ROLES)
def test_public_roles_cannot_execute_any_queue_function(db: Connection, role: str) -> None:
    functions = public_functions(db)

    for function in functions:
        if role == "authenticated" and function.name in USER_FUNCTIONS:
            continue  # the one thing a signed-in user may do; test_a_user_cancels_only_their_own_job
        allowed = db.execute(
            "select has_function_privilege(%s, %s::oid, 'execute') as allowed", (role, function.oid)
        ).fetchone()
        assert allowed == {"allowed": False}, function.name
        if function.is_trigger:
            continue  # trigger functions cannot be called directly by anyone
        with pytest.raises(InsufficientPrivilege):
            run_as(db, role, function.call())


@pytest.mark.parametrize("role", PUBLIC_ROLES)
@pytest.mark.parametrize(
    "statement",
    [
        "insert into public.coding_jobs (prompt) values ('sneaky')",
        "update public.coding_jobs set status = 'completed'",
        "delete from public.coding_jobs",
        "truncate public.coding_jobs",
    ],
)
def test_public_roles_cannot_write_the_table(db: Connection, role: str, statement: str) -> None:
    insert_job(db, user_id=None)

    with pytest.raises(InsufficientPrivilege):
        run_as(db, role, statement)

    assert db.execute(
        "select count(*) as jobs from public.coding_jobs where status = 'pending'"
    ).fetchone() == {"jobs": 1}


def test_anon_cannot_read_the_table(db: Connection) -> None:
    with pytest.raises(InsufficientPrivilege):
        run_as(db, "anon", "select * from public.coding_jobs")


def visible_job_ids(db: Connection, claims: dict[str, str] | None) -> set[uuid.UUID]:
    """The job ids `authenticated` sees with these JWT claims, as PostgREST would set them."""
    with db.transaction():
        db.execute("set local role authenticated")
        if claims is not None:
            db.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        return {row["id"] for row in db.execute("select id from public.coding_jobs").fetchall()}  # type: ignore[misc]


def test_authenticated_users_see_only_their_own_jobs(db: Connection) -> None:
    # Given jobs of two users and one of nobody
    alice, bob = uuid.uuid4(), uuid.uuid4()
    alice_jobs = {insert_job(db, alice), insert_job(db, alice)}
    bob_jobs = {insert_job(db, bob)}
    insert_job(db, None)

    # Then each user sees exactly their own, and a request without a user sees none
    assert visible_job_ids(db, {"sub": str(alice), "role": "authenticated"}) == alice_jobs
    assert visible_job_ids(db, {"sub": str(bob), "role": "authenticated"}) == bob_jobs
    assert visible_job_ids(db, {"sub": str(uuid.uuid4()), "role": "authenticated"}) == set()
    assert visible_job_ids(db, None) == set()


def test_service_role_can_call_every_queue_function(db: Connection) -> None:
    functions = public_functions(db)

    called = set()
    for function in functions:
        if function.is_trigger or function.name in USER_FUNCTIONS:
            continue
        try:
            run_as(db, "service_role", function.call())
        except InsufficientPrivilege:
            raise
        except psycopg.Error:
            pass  # refused a null argument: past the privilege check, which is what this test is about
        called.add(function.name)

    assert called >= QUEUE_FUNCTIONS


def test_service_role_can_write_the_table(db: Connection) -> None:
    run_as(db, "service_role", "insert into public.coding_jobs (prompt) values ('from the service')")
    run_as(db, "service_role", "update public.coding_jobs set priority = 10")
    run_as(db, "service_role", "delete from public.coding_jobs")

    assert db.execute("select count(*) as jobs from public.coding_jobs").fetchone() == {"jobs": 0}


def test_job_status_enum_matches_the_database(db: Connection) -> None:
    row = db.execute("select enum_range(null::public.job_status)::text[] as statuses").fetchone()

    assert row == {"statuses": JOB_STATUSES}


def as_user(db: Connection, user_id: uuid.UUID | None, statement: str, params: tuple[object, ...]) -> object:
    """Run one statement as `authenticated` with this user's JWT claims, as PostgREST would; its value."""
    with db.transaction():
        db.execute("set local role authenticated")
        if user_id is not None:
            claims = {"sub": str(user_id), "role": "authenticated"}
            db.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        row = db.execute(statement, params).fetchone()
        return None if row is None else next(iter(row.values()))


def test_a_user_cancels_only_their_own_job(db: Connection) -> None:
    # Given a pending job of Alice's
    alice, bob = uuid.uuid4(), uuid.uuid4()
    job_id = insert_job(db, alice)

    # When Bob tries to cancel it, he hears that no such job exists; without a user the call is refused
    assert as_user(db, bob, "select public.cancel_my_job(%s)", (job_id,)) == "not_found"
    with pytest.raises(InsufficientPrivilege):
        as_user(db, None, "select public.cancel_my_job(%s)", (job_id,))
    assert db.execute("select status::text from public.coding_jobs where id = %s", (job_id,)).fetchone() == {
        "status": "pending"
    }

    # Then Alice can, and a signed-in user still cannot call the service's cancellation
    assert as_user(db, alice, "select public.cancel_my_job(%s)", (job_id,)) == "cancelled"
    with pytest.raises(InsufficientPrivilege):
        as_user(db, alice, "select * from public.cancel_jobs(array[%s]::uuid[])", (job_id,))


def test_user_functions_are_security_definer_with_an_empty_search_path(db: Connection) -> None:
    rows = db.execute(
        """
        select p.proname as name, p.proconfig as config,
               has_function_privilege('authenticated', p.oid, 'execute') as authenticated,
               has_function_privilege('anon', p.oid, 'execute') as anon,
               has_function_privilege('service_role', p.oid, 'execute') as service_role
          from pg_proc p
         where p.pronamespace = 'public'::regnamespace and p.prosecdef
        """
    ).fetchall()
    definers = {str(row["name"]): row for row in rows}

    assert definers.keys() >= USER_FUNCTIONS
    for name, row in definers.items():
        assert row["config"] == ['search_path=""'], name
    for name in USER_FUNCTIONS:
        assert (definers[name]["authenticated"], definers[name]["anon"], definers[name]["service_role"]) == (
            True,
            False,
            False,
        )
