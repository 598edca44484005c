"""Liveness: judge the worker processes from their heartbeat files."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from health.run_folder import WorkerBeat, process_running, process_state, read_beats

NO_WORKERS_REASON = (
    "no worker heartbeat files: no worker process is running, or the worker and the health server "
    "use different RUN_DIR folders"
)


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerStatus:
    beat: WorkerBeat
    alive: bool
    #: Seconds since the worker's consumer last ticked.
    heartbeat_age_s: float
    #: Why this worker makes the service unhealthy; None when it is fine.
    problem: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "pid": self.beat.pid,
            "worker_id": self.beat.worker_id,
            "alive": self.alive,
            "state": self.beat.state,
            "last_heartbeat": iso(self.beat.heartbeat_at),
            "heartbeat_age_s": round(self.heartbeat_age_s, 3),
            "jobs_in_progress": self.beat.jobs_in_progress,
            "jobs_processed": self.beat.jobs_processed,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Liveness:
    workers: tuple[WorkerStatus, ...]
    #: Every reason the service is unhealthy; empty when it is healthy.
    problems: tuple[str, ...]

    @property
    def healthy(self) -> bool:
        return not self.problems


def iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat()


def judge(beat: WorkerBeat, now: float, window_s: float) -> WorkerStatus:
    """One worker: dead when its process is gone, stale when its consumer has not ticked within the window."""
    age_s = max(now - beat.heartbeat_at, 0.0)
    alive = process_running(beat.pid, beat.process_start)
    problem: str | None = None
    if not alive:
        problem = f"worker process {beat.pid} is dead (its heartbeat file remains)"
    elif age_s > window_s:
        frozen = " (the process is stopped)" if process_state(beat.pid) == "T" else ""
        problem = (
            f"worker process {beat.pid} has not ticked for {age_s:.1f} s, "
            f"over the {window_s:.1f} s window{frozen}"
        )
    if problem is None and alive and beat.state == "running":
        problem = _thread_problem(beat, now)
    return WorkerStatus(beat=beat, alive=alive, heartbeat_age_s=age_s, problem=problem)


def _thread_problem(beat: WorkerBeat, now: float) -> str | None:
    """A background thread of the worker that died, or stopped ticking for longer than it may."""
    for thread in beat.threads:
        name = thread.get("name", "?")
        if not thread.get("alive", True):
            error = thread.get("last_error")
            return f"worker process {beat.pid}: background thread {name} is dead" + (
                f" (last error: {error})" if error else ""
            )
        stale_after_s, last_tick = thread.get("stale_after_s"), thread.get("last_tick")
        if isinstance(stale_after_s, int | float) and isinstance(last_tick, int | float):
            silent_s = now - last_tick
            if silent_s > stale_after_s:
                return (
                    f"worker process {beat.pid}: background thread {name} has not ticked for "
                    f"{silent_s:.1f} s, over its {stale_after_s:.1f} s window"
                )
    return None


def assess(run_dir: Path, now: float, window_s: float, *, master_pid: int | None = None) -> Liveness:
    """The service's liveness from the run folder's heartbeat files (only master_pid's workers, if given)."""
    workers = tuple(judge(beat, now, window_s) for beat in read_beats(run_dir, master_pid=master_pid))
    if not workers:
        return Liveness(workers=(), problems=(NO_WORKERS_REASON,))
    return Liveness(workers=workers, problems=tuple(w.problem for w in workers if w.problem is not None))


def live_worker_pids(run_dir: Path, *, master_pid: int | None = None) -> list[int]:
    """Pids of worker processes whose heartbeat file is theirs and who are still running."""
    beats = read_beats(run_dir, master_pid=master_pid)
    return [beat.pid for beat in beats if process_running(beat.pid, beat.process_start)]
