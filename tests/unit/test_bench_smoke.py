"""The throughput benchmark's machinery, without running or timing anything: stopwatch, arithmetic, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from dramatiq.message import Message

from bench.report import RoundResult, render_markdown, summarise
from bench.stopwatch import Stopwatch
from bench.throughput import parse_args
from bench.worker_process import WorkerRun, dramatiq_command

STUB_BROKER: Any = None  # the stopwatch never looks at the broker


def _proxy() -> MessageProxy:
    return MessageProxy(Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={}))


def _round(broker: str, round_no: int, jobs_per_s: float, extra: dict[str, Any] | None = None) -> RoundResult:
    return RoundResult(
        broker=broker,
        label=broker.title(),
        round_no=round_no,
        jobs=1000,
        jobs_per_s=jobs_per_s,
        first_to_last_s=1.0,
        startup_s=0.5,
        extra=extra or {},
    )


def test_stopwatch_writes_its_file_at_the_expected_count_and_counts_failures(tmp_path: Path) -> None:
    # Given a stopwatch expecting three settled jobs
    result = tmp_path / "stopwatch.json"
    stopwatch = Stopwatch(3, result)

    # When two jobs are acked, nothing is written yet
    stopwatch.after_ack(STUB_BROKER, _proxy())
    stopwatch.after_ack(STUB_BROKER, _proxy())
    assert not result.exists()

    # Then the third, a failure, completes the file, whole
    stopwatch.after_nack(STUB_BROKER, _proxy())
    data = json.loads(result.read_text(encoding="utf-8"))
    assert data["settled"] == 3
    assert data["failed"] == 1
    assert data["first_to_last_s"] >= 0
    assert data["last_settled_at"] >= data["first_settled_at"]
    assert not list(tmp_path.glob("*.partial"))


def test_stopwatch_overrides_hooks_dramatiq_really_calls() -> None:
    for hook in ("after_ack", "after_nack"):
        assert getattr(Stopwatch, hook) is not getattr(dramatiq.Middleware, hook)


def test_rate_counts_the_intervals_between_first_and_last_job() -> None:
    run = WorkerRun(settled=101, failed=0, first_to_last_s=2.0, startup_s=0.4, pid=1)
    assert run.jobs_per_s == pytest.approx(50.0)


def test_summary_takes_medians_and_the_ratio_to_rabbitmq() -> None:
    trips = {"round_trips_per_job": 1.5, "function_calls": {"claim_jobs": 500, "complete_job": 1000}}
    results = [
        _round("supabase", 1, 900, {**trips, "jobs_per_claim": 2.0}),
        _round("rabbitmq", 1, 3000),
        _round("supabase", 2, 1000, {**trips, "jobs_per_claim": 2.0}),
        _round("rabbitmq", 2, 2000),
        _round("supabase", 3, 5000, {**trips, "jobs_per_claim": 2.0}),
        _round("rabbitmq", 3, 2500),
    ]
    settings = {"jobs": 1000, "rounds": 3, "threads": 8, "brokers": ["supabase", "rabbitmq"]}
    environment = {
        "date": "today",
        "cpus": 2,
        "cpu_model": "cpu",
        "python": "3.11",
        "dramatiq": "2.2.1",
        "load_average_before": [1.0, 1.0, 1.0],
        "load_average_after": [2.0, 2.0, 2.0],
    }

    summary = summarise(results, args=settings, environment=environment)

    ours, reference = summary["brokers"]["supabase"], summary["brokers"]["rabbitmq"]
    assert ours["median_jobs_per_s"] == 1000
    assert reference["median_jobs_per_s"] == 2500
    assert ours["ratio_to_rabbitmq"] == pytest.approx(0.4)
    assert ours["median_round_trips_per_job"] == 1.5
    table = render_markdown(summary)
    assert "| Supabase | 900 / 1,000 / 5,000 | 1,000 | 0.50 | 0.40 |" in table
    assert "| Rabbitmq | 3,000 / 2,000 / 2,500 | 2,500 | 0.50 | 1.00 |" in table
    assert "round trips per job (median): 1.500" in table


def test_ratio_is_not_invented_without_rabbitmq() -> None:
    summary = summarise(
        [_round("redis", 1, 100)],
        args=dict.fromkeys(("jobs", "rounds", "threads", "brokers")),
        environment={},
    )
    assert summary["brokers"]["redis"]["ratio_to_rabbitmq"] is None


def test_arguments_reject_unknown_brokers_and_derive_a_round_timeout() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--brokers", "supabase,kafka"])
    args = parse_args(["--jobs", "1000", "--brokers", "supabase, rabbitmq"])
    assert args.brokers == ["supabase", "rabbitmq"]
    assert args.timeout > 0


def test_the_worker_is_the_dramatiq_cli_with_one_process() -> None:
    command = dramatiq_command("bench.supabase_worker", 8)
    assert Path(command[0]).name == "dramatiq"
    assert command[1:] == ["bench.supabase_worker", "--processes", "1", "--threads", "8"]
