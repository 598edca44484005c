"""The comparison's machinery, without timing anything: pickups over UDP, shared stopwatches, the tables."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import compare, stamp, table_health
from bench.pickup import Pickups, StampListener, percentile
from bench.stopwatch import Stopwatch
from bench.worker_process import _wait_for_shared_result

STUB_BROKER: Any = None


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert Pickups([3.0, 1.0, 2.0]).p50_ms == 2.0


def test_the_stamp_actor_reports_its_start_to_the_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    listener = StampListener()
    try:
        monkeypatch.setenv("BENCH_PICKUP_PORT", str(listener.port))
        sent_at = time.monotonic()
        stamp.stamp(sent_at)
        assert 0 <= listener.wait_for(sent_at, timeout_s=5) < 5_000
    finally:
        listener.close()


def test_shared_stopwatches_are_added_up_once_they_count_every_job(tmp_path: Path) -> None:
    # Given two worker processes' stopwatches, each settling part of five jobs
    result = tmp_path / "stopwatch.json"
    for pid, (count, first, latest) in {101: (3, 10.0, 12.0), 102: (2, 10.5, 12.5)}.items():
        part = {"settled": count, "failed": 0, "first_perf_s": first, "latest_perf_s": latest}
        part |= {"first_settled_at": 1000.0 + first, "pid": pid}
        (tmp_path / f"stopwatch.json.{pid}").write_text(json.dumps(part), encoding="utf-8")
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # When the harness reads them
        found = _wait_for_shared_result(idle, result, 5, tmp_path / "log", time.monotonic() + 5)
    finally:
        idle.kill()
        idle.wait()
    # Then the run spans the first process's first job to the last one's last
    assert found["settled"] == 5
    assert found["first_to_last_s"] == pytest.approx(2.5)


def test_a_shared_stopwatch_writes_progress_files(tmp_path: Path) -> None:
    stopwatch = Stopwatch(10, tmp_path / "stopwatch.json", shared=True)
    stopwatch.after_ack(STUB_BROKER, STUB_BROKER)
    deadline = time.monotonic() + 5
    while not list(tmp_path.glob("stopwatch.json.*[0-9]")) and time.monotonic() < deadline:
        time.sleep(0.02)
    [progress] = list(tmp_path.glob("stopwatch.json.*[0-9]"))
    assert json.loads(progress.read_text(encoding="utf-8"))["settled"] == 1
    assert not (tmp_path / "stopwatch.json").exists()


def test_the_comparison_prints_one_table_with_medians_and_ratios() -> None:
    args = compare.parse_args(["--rounds", "2", "--skip", "rest"])
    systems = {s.key: s for s in compare.build_systems(args)}
    assert "rest" not in systems and {"prefetch", "default", "history", "two", "rabbitmq", "floor"} <= set(
        systems
    )
    summary = {
        "settings": {k: v for k, v in vars(args).items() if k != "skip"},
        "environment": {
            "date": "today",
            "cpus": 2,
            "cpu_model": "cpu",
            "python": "3.11",
            "load_average_before": [1.0],
            "load_average_after": [1.0],
        },
        "systems": [
            {
                "key": "prefetch",
                "label": "P",
                "figures": {"send": [900, 1100], "process": [4000, 4200]},
                "pickups": {"short": [2.0, 3.0], "idle": [2.5]},
            },
            {"key": "default", "label": "D", "figures": {"process": [4000, 3780]}, "pickups": {}},
            {"key": "floor", "label": "F", "figures": {"send": [1000, 1000]}, "pickups": {}},
        ],
    }
    table = compare.render_markdown(summary)
    assert "| P | 1,000 | — | 4,100 | 2.0 / 3.0 | 2.5 / 2.5 |" in table
    assert "send() / floor INSERT 1.00" in table
    assert "service default / prefetch, processing 0.95" in table


def test_the_table_health_report_shows_dead_tuples_sizes_and_claim_scans() -> None:
    def row(dead: int, vacuums: int, claim_ms: float) -> dict[str, Any]:
        return {
            "dead": dead,
            "autovacuums": vacuums,
            "heap_bytes": 2**20,
            "index_bytes": 2**20,
            "claim_scan_ms": claim_ms,
            "pending": 0,
        }

    samples = {
        name: [row(0, 0, 0.02), row(9_000, 1, 0.02), row(5_000, 1, 0.03), row(7_000, 2, 0.02)]
        for name in ("tuned", "defaults")
    }
    args = table_health.parse_args(["--seconds", "20"])
    table = table_health.render_markdown(samples, args)
    assert "| from the migrations (20261202000400) | 9,000 / 7,000 | 2 |" in table
