"""The Heartbeat middleware on a real worker over a real database: its file, its counts, its clean-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from broker.broker import SupabaseBroker
from health.liveness import assess
from health.run_folder import WorkerBeat, beat_path, read_beats, write_beat
from service.settings import load_settings
from tests.support.brokers import running_worker, wait_until
from worker.heartbeat import Heartbeat

#: Seconds to wait for the worker to run the test's jobs.
JOBS_S = 20.0
#: The liveness window used to judge the live worker, in seconds.
WINDOW_S = 3.0


def leftover_of_a_dead_process(run_dir: Path) -> int:
    """A heartbeat file of a worker process that has exited, as a SIGKILL leaves one."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=10)
    write_beat(
        run_dir,
        WorkerBeat(
            pid=child.pid,
            worker_id=f"gone:{child.pid}:000000",
            process_start=None,
            started_at=0.0,
            heartbeat_at=0.0,
            written_at=0.0,
            state="running",
            jobs_in_progress=1,
            jobs_processed=0,
        ),
    )
    return child.pid


def test_a_worker_beats_counts_its_jobs_and_cleans_up(
    broker: SupabaseBroker, actors: SimpleNamespace, database_url: str, tmp_path: Path
) -> None:
    # Given a run folder holding the file of a dead worker process, and a broker with the Heartbeat middleware
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead_pid = leftover_of_a_dead_process(run_dir)
    settings = load_settings(_env_file=None, database_url=database_url, run_dir=run_dir)
    broker.add_middleware(Heartbeat(settings, broker))

    with running_worker(broker, threads=2):
        # Then booting removed the dead process's file and wrote ours
        assert not beat_path(run_dir, dead_pid).exists()
        [first] = read_beats(run_dir)
        assert first.worker_id == broker.worker_id
        assert first.state == "running"
        assert first.master_pid == os.getppid()
        assert assess(run_dir, first.written_at, WINDOW_S).healthy

        # When one job succeeds and one fails on every attempt (max_retries=2: three runs)
        actors.record.send("ok")
        actors.fail_always.send("bad")

        # Then the beats count them: processed, retried, dead-lettered, and how long they took
        def counted() -> WorkerBeat | None:
            beats = read_beats(run_dir)
            stats = {job.actor_name: job for job in beats[0].jobs} if beats else {}
            bad = stats.get("fail_always")
            done = "record" in stats and bad is not None and bad.failed == 1
            return beats[0] if done and beats[0].jobs_in_progress == 0 else None

        last = wait_until(counted, JOBS_S, lambda: read_beats(run_dir))
        assert last is not None
        stats = {job.actor_name: job for job in last.jobs}
        assert (stats["record"].processed, stats["record"].retried, stats["record"].failed) == (1, 0, 0)
        assert (
            stats["fail_always"].processed,
            stats["fail_always"].retried,
            stats["fail_always"].failed,
        ) == (
            3,
            2,
            1,
        )
        assert last.jobs_processed == 4
        assert sum(stats["fail_always"].duration_counts) == 3
        # And the consumer's tick keeps the beat fresh while the worker idles
        wait_until(
            lambda: read_beats(run_dir)[0].heartbeat_at > last.heartbeat_at + 1, 5.0, "a later consumer tick"
        )

    # Then a clean stop, once the broker has closed (jobs handed back, registry left), removes the file
    assert len(read_beats(run_dir)) == 1
    broker.close()
    assert read_beats(run_dir) == []
