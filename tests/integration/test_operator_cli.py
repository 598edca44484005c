"""The operator CLI (`supabase-queue-worker`): every command over both transports, in-process (one real run of
the installed console script too)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from broker.transport import Transport
from ops.cli import main, run
from service.settings import load_settings
from tests.support.brokers import Db, insert_job, job
from tests.support.processes import cli_env

CONSOLE_SCRIPT = Path(sys.executable).parent / "supabase-queue-worker"


def cli(transport: Transport, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = run(list(argv), transport, load_settings(_env_file=None), out)
    return code, out.getvalue()


def cli_json(transport: Transport, *argv: str) -> Any:
    code, text = cli(transport, *argv, "--json")
    assert code == 0, text
    return json.loads(text)


def test_every_command_works_over_the_transport(db: Db, transport: Transport) -> None:
    # Given a failed job, a pending one, a running one (a registered worker holds it) and a delayed one
    failed = insert_job(db, prompt="will fail", actor_name="fetch")
    db.execute(
        "update public.coding_jobs set status = 'failed', completed_at = now(), error_message = "
        "'TimeoutError: upstream took too long' where id = %s",
        (failed,),
    )
    pending = insert_job(db, prompt="waiting " + "x" * 300)
    running = insert_job(db, prompt="running", queue_name="slow")
    db.execute(
        "select public.register_worker('ops-test-worker', 'heartbeat', 600000, 'host-a', 42, '{slow}')"
    )
    db.execute(
        "select * from public.claim_jobs('ops-test-worker', 'slow', 1, 60000, %s::uuid)", (str(uuid.uuid4()),)
    )

    # stats: counts by queue and status, with the oldest wait, workers, pauses; by actor on request
    stats = cli_json(transport, "stats", "--actors")
    queues = {q["queue"]: q for q in stats["queues"]}
    assert queues["default"]["jobs"]["pending"] == 1 and queues["default"]["jobs"]["failed"] == 1
    assert queues["slow"]["jobs"]["processing"] == 1 and queues["slow"]["workers"] == 1
    assert queues["default"]["oldest_pending_wait_s"] is not None
    assert {(a["actor_name"], a["status"]) for a in stats["actors"]} >= {("fetch", "failed")}
    code, table = cli(transport, "stats")
    assert code == 0 and "default" in table and "no worker consumes it" in table

    # jobs and job: filtered lists, one job with its attempts, prompts as excerpts
    assert [j["id"] for j in cli_json(transport, "jobs", "--status", "failed", "--error", "TIMEOUT")] == [
        failed
    ]
    assert [j["id"] for j in cli_json(transport, "jobs", "--queue", "slow")] == [running]
    shown = cli_json(transport, "job", running)
    assert shown["locked_by"] == "ops-test-worker" and shown["attempts"][-1]["outcome"] == "running"
    code, text = cli(transport, "job", pending)
    assert code == 0 and "waiting xxx" in text and "x" * 300 not in text
    assert cli(transport, "job", str(uuid.uuid4()))[0] == 1

    # workers: which workers hold which jobs
    held = cli_json(transport, "workers")
    [worker] = [w for w in held["workers"] if w["worker_id"] == "ops-test-worker"]
    assert worker["jobs"] == [running] and [j["id"] for j in held["running"]] == [running]

    # retry: a dry run changes nothing, then the retry does
    dry = cli_json(transport, "retry", "--actor", "fetch", "--dry-run")
    assert dry["dry_run"] is True and [j["id"] for j in dry["jobs"]] == [failed]
    assert job(db, failed)["status"] == "failed"
    code, text = cli(transport, "retry", failed)
    assert code == 0 and "Retried 1 failed job(s)" in text
    assert job(db, failed)["status"] == "pending"

    # cancel: a pending job at once, a running one through its worker
    outcomes = {o["job_id"]: o["outcome"] for o in cli_json(transport, "cancel", pending, running)}
    assert outcomes == {pending: "cancelled", running: "cancelling"}
    assert job(db, running)["cancel_requested_at"] is not None

    # pause and resume
    assert cli(transport, "pause", "default", "--reason", "deploy")[0] == 0
    assert cli_json(transport, "stats")["queues"][0]["paused"]["reason"] == "deploy"
    code, text = cli(transport, "resume", "default")
    assert code == 0 and "Resumed" in text

    # prune: finished jobs past their retention go now
    db.execute(
        "update public.coding_jobs set completed_at = now() - interval '8 days' where id = %s", (pending,)
    )
    assert cli_json(transport, "prune") == {"deleted": 1, "more": False}


def test_retry_without_a_filter_is_refused_before_it_reaches_the_queue(transport: Transport) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(transport, "retry")
    assert exit_info.value.code == 2


def test_the_console_script_is_installed_and_reads_the_settings(
    database_url: str, db: Db, tmp_path: Path
) -> None:
    insert_job(db, prompt="counted")

    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "stats", "--json"],
        env=cli_env(database_url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["queues"][0]["jobs"]["pending"] == 1
    unreachable = subprocess.run(
        [str(CONSOLE_SCRIPT), "workers"],
        env=cli_env("postgresql://nobody@127.0.0.1:1/none"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unreachable.returncode == 3 and "cannot reach the queue" in unreachable.stderr


def test_job_shows_a_unique_jobs_key_and_a_periodic_jobs_tick(db: Db, transport: Transport) -> None:
    # Given a job the Edge Function inserted with an idempotency key, and a job a schedule enqueued for a tick
    keyed = insert_job(db, prompt="keyed", idempotency_key="request-7f3a")
    tick = "2026-12-02T09:00:00+00:00"
    periodic = insert_job(db, actor_name="refresh_usage", options={"periodic_tick": tick})

    # Then `job` shows each, in JSON and in its table
    assert cli_json(transport, "job", keyed)["idempotency_key"] == "request-7f3a"
    code, text = cli(transport, "job", keyed)
    assert code == 0 and "idempotency key" in text and "request-7f3a" in text
    code, text = cli(transport, "job", periodic)
    assert code == 0 and "periodic tick" in text and tick in text
    assert cli_json(transport, "job", periodic)["idempotency_key"] is None


def test_json_output_is_redacted_like_the_tables(db: Db, transport: Transport) -> None:
    # Given a failed job whose error quotes a connection string with its password (tracebacks do)
    failed = insert_job(db, prompt="connect to postgresql://app:hunter2@db:5432/app")
    db.execute(
        "update public.coding_jobs set status = 'failed', completed_at = now(), error_message ="
        " 'OperationalError: password=hunter2 rejected' where id = %s",
        (failed,),
    )

    # Then neither the table nor --json shows the password
    for argv in (("jobs", "--status", "failed"), ("job", failed)):
        code, text = cli(transport, *argv)
        assert code == 0 and "hunter2" not in text
        code, text = cli(transport, *argv, "--json")
        assert code == 0 and "hunter2" not in text and "***" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs", "--limit", "0"],
        ["jobs", "--limit", "5000"],
        ["jobs", "--limit", "ten"],
        ["retry", "--all", "--limit", "-1"],
        ["prune", "--completed-days", "-1"],
        ["prune", "--failed-days", "1.5"],
    ],
)
def test_number_mistakes_exit_2_and_say_what_was_expected(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # (the SQL would clamp a limit silently, and a negative retention would mean "keep forever")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "out of range" in err or "not a whole number" in err
