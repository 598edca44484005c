"""What a chaos run did to the jobs: read the executions file and the rows, and count what matters.

- lost: jobs whose row is gone, or that ended `completed` without an execution that finished;
- executed again: completed jobs with more than one execution that finished (run again after a crash between
  its end and its ack: at least once, as every queue that acks after the work);
- overlapping: pairs of finished executions of one job whose run times overlap (two workers doing it at once);
- failed by chaos: jobs that ended `failed` (the benchmark's job never fails on its own);
- stuck: jobs neither completed nor failed once the chaos stopped and the queue had time to drain;
- rescue latency: for each execution cut short by a SIGKILL, from the kill to the job's next start.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class Execution:
    job: str
    pid: int
    started: float
    finished: float | None = None
    interrupted: float | None = None


@dataclasses.dataclass
class ChaosReport:
    jobs: int
    completed: int
    executions: int
    interrupted: int
    lost: int
    executed_again: int
    overlapping: int
    failed: int
    stuck: int
    rescue_latencies_s: list[float]
    stopped_rescue_latencies_s: list[float]
    events: dict[str, int]
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.lost == self.overlapping == self.failed == self.stuck == 0

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rescue_median_s"] = _median(self.rescue_latencies_s)
        data["rescue_max_s"] = max(self.rescue_latencies_s, default=None)
        return data

    def table(self) -> str:
        rows = [
            ("jobs", f"{self.jobs:,}"),
            ("chaos events", ", ".join(f"{n} {kind}" for kind, n in sorted(self.events.items()))),
            ("run time (s)", f"{self.duration_s:.0f}"),
            ("executions (interrupted)", f"{self.executions:,} ({self.interrupted:,})"),
            ("lost", str(self.lost)),
            ("completed jobs executed again", str(self.executed_again)),
            ("overlapping executions of one job", str(self.overlapping)),
            ("jobs failed by chaos", str(self.failed)),
            ("jobs stuck", str(self.stuck)),
            ("rescue after SIGKILL, median / max (s)", _pair(self.rescue_latencies_s)),
            ("rescue after SIGSTOP past the lease, median / max (s)", _pair(self.stopped_rescue_latencies_s)),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|------:|"]
        lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
        return "\n".join(lines)


def read_executions(path: Path) -> list[Execution]:
    """The executions recorded in the file, by execution id, in the order they started."""
    found: dict[str, Execution] = {}
    if not path.exists():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill of the whole machine: not one of ours
        execution = found.setdefault(
            event["execution"], Execution(job=event["job"], pid=int(event["pid"]), started=float(event["t"]))
        )
        if event["event"] == "finish":
            execution.finished = float(event["t"])
        elif event["event"] == "interrupted":
            execution.interrupted = float(event["t"])
    return sorted(found.values(), key=lambda e: e.started)


def analyse(
    rows: Iterable[dict[str, Any]],
    expected: set[str],
    executions: list[Execution],
    kills: dict[int, float],
    stops: dict[int, float],
    events: dict[str, int],
    duration_s: float,
) -> ChaosReport:
    """The report of a run: `rows` are the final rows; `kills`/`stops` map pids to when chaos hit them."""
    by_job: dict[str, list[Execution]] = defaultdict(list)
    for execution in executions:
        by_job[execution.job].append(execution)
    statuses = {str(row["id"]): str(row["status"]) for row in rows}
    finished = {job: [e for e in runs if e.finished is not None] for job, runs in by_job.items()}

    lost = len(expected - statuses.keys())
    lost += sum(1 for job, status in statuses.items() if status == "completed" and not finished.get(job))
    overlapping = sum(_overlaps(runs) for runs in finished.values())
    rescue, stopped_rescue = _rescue_latencies(by_job, kills, stops)
    return ChaosReport(
        jobs=len(expected),
        completed=sum(1 for status in statuses.values() if status == "completed"),
        executions=len(executions),
        interrupted=sum(1 for e in executions if e.finished is None),
        lost=lost,
        executed_again=sum(
            1 for job, runs in finished.items() if len(runs) > 1 and statuses.get(job) == "completed"
        ),
        overlapping=overlapping,
        failed=sum(1 for status in statuses.values() if status == "failed"),
        stuck=sum(1 for status in statuses.values() if status not in ("completed", "failed")),
        rescue_latencies_s=rescue,
        stopped_rescue_latencies_s=stopped_rescue,
        events=events,
        duration_s=duration_s,
    )


def _overlaps(runs: list[Execution]) -> int:
    count = 0
    for i, first in enumerate(runs):
        for second in runs[i + 1 :]:
            assert first.finished is not None and second.finished is not None
            if first.started < second.finished and second.started < first.finished:
                count += 1
    return count


def _rescue_latencies(
    by_job: dict[str, list[Execution]], kills: dict[int, float], stops: dict[int, float]
) -> tuple[list[float], list[float]]:
    """From the moment chaos hit an unfinished execution's process to the job's next start."""
    rescue: list[float] = []
    stopped: list[float] = []
    for runs in by_job.values():
        for run, following in itertools.pairwise(runs):
            if run.finished is not None:
                continue
            killed_at = kills.get(run.pid)
            if killed_at is not None and run.started <= killed_at <= following.started:
                rescue.append(following.started - killed_at)
                continue
            stopped_at = stops.get(run.pid)
            if stopped_at is not None and run.started <= stopped_at <= following.started:
                stopped.append(following.started - stopped_at)
    return rescue, stopped


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _pair(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.1f} / {max(values):.1f} ({len(values)} jobs)"
