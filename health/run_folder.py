"""Heartbeat files in the run folder: how worker processes tell the health server they are alive.

Each worker process owns `worker-<pid>.json` and replaces it atomically (write a temporary file, then
`os.replace`), so a reader sees either the previous beat or the next one, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Any

from health.job_counters import ActorJobStats

BEAT_PREFIX = "worker-"
BEAT_SUFFIX = ".json"
#: Process states in /proc/<pid>/stat that mean the process has ended (zombie, dead).
ENDED_STATES = frozenset({"Z", "X"})


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerBeat:
    """One worker process's last heartbeat, as written to its file."""

    pid: int
    worker_id: str
    #: The process's start time from /proc, so a reused pid is not mistaken for this process.
    process_start: str | None
    #: Epoch seconds.
    started_at: float
    #: Epoch seconds of the broker's last consumer tick.
    heartbeat_at: float
    #: Epoch seconds at which the file was written.
    written_at: float
    #: "running", or "stopping" once the worker has begun its graceful shutdown.
    state: str
    jobs_in_progress: int
    jobs_processed: int
    jobs: tuple[ActorJobStats, ...] = ()
    #: Upper bounds of the duration histogram the `jobs` entries were counted with.
    duration_bounds_s: tuple[float, ...] = ()
    #: The dramatiq main process that started this worker: a health server judges its own tree's workers.
    master_pid: int | None = None
    #: The worker's supervised background threads: name, alive, last_tick (epoch s), stale_after_s, restarts,
    #: last_error.
    threads: tuple[dict[str, Any], ...] = ()

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["jobs"] = [job.as_json() for job in self.jobs]
        data["duration_bounds_s"] = list(self.duration_bounds_s)
        data["threads"] = [dict(thread) for thread in self.threads]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerBeat:
        return cls(
            pid=int(data["pid"]),
            worker_id=str(data["worker_id"]),
            process_start=None if data.get("process_start") is None else str(data["process_start"]),
            started_at=float(data["started_at"]),
            heartbeat_at=float(data["heartbeat_at"]),
            written_at=float(data["written_at"]),
            state=str(data["state"]),
            jobs_in_progress=int(data["jobs_in_progress"]),
            jobs_processed=int(data["jobs_processed"]),
            jobs=tuple(ActorJobStats.from_json(job) for job in data.get("jobs", ())),
            duration_bounds_s=tuple(float(bound) for bound in data.get("duration_bounds_s", ())),
            master_pid=None if data.get("master_pid") is None else int(data["master_pid"]),
            threads=tuple(dict(thread) for thread in data.get("threads", ()) if isinstance(thread, dict)),
        )


def beat_path(run_dir: Path, pid: int) -> Path:
    return run_dir / f"{BEAT_PREFIX}{pid}{BEAT_SUFFIX}"


def write_beat(run_dir: Path, beat: WorkerBeat) -> None:
    """Replace this process's heartbeat file in one step."""
    path = beat_path(run_dir, beat.pid)
    # One temporary file per writing thread: the heartbeat thread and a shutdown hook may write at once.
    temporary = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
    temporary.write_text(json.dumps(beat.as_json()), encoding="utf-8")
    os.replace(temporary, path)


def remove_beat(run_dir: Path, pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        beat_path(run_dir, pid).unlink()


def read_beats(run_dir: Path, *, master_pid: int | None = None) -> list[WorkerBeat]:
    """Every readable heartbeat file by pid (only `master_pid`'s workers, if given).

    A file removed or garbled while we look is skipped.
    """
    beats: list[WorkerBeat] = []
    try:
        paths = sorted(run_dir.glob(f"{BEAT_PREFIX}*{BEAT_SUFFIX}"))
    except OSError:
        return beats
    for path in paths:
        try:
            beats.append(WorkerBeat.from_json(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if master_pid is not None:
        beats = [beat for beat in beats if beat.master_pid == master_pid]
    return sorted(beats, key=lambda beat: beat.pid)


def remove_ended_beats(run_dir: Path) -> list[int]:
    """Delete the files of processes that are gone (say, after a SIGKILL); returns their pids."""
    removed: list[int] = []
    for beat in read_beats(run_dir):
        if not process_running(beat.pid, beat.process_start):
            remove_beat(run_dir, beat.pid)
            removed.append(beat.pid)
    return removed


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces), or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def process_state(pid: int) -> str | None:
    """The one-letter state of /proc/<pid>/stat: R, S, D, T (stopped), Z (zombie)..."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def process_running(pid: int, start: str | None) -> bool:
    """True when `pid` is still the process that wrote the beat: it exists, has not ended, was not reused."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if process_state(pid) in ENDED_STATES:
        return False
    if start is not None:
        current = process_start(pid)
        if current is not None and current != start:
            return False
    return True
