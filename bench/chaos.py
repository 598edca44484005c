"""The chaos benchmark: real workers, real faults, and a count of what they did to the jobs.

    .venv/bin/python -m bench.chaos          # 3,000 jobs, 2 containers x 1 process x 4 threads, >= 2 min
    .venv/bin/python -m bench.chaos --jobs 200 --min-run-s 20 --kills 3 --no-restart --no-stop   # a smoke run

It starts a PostgreSQL of its own (the embedded server, in a temporary folder, so it may restart it), applies
the migrations, and runs "containers": `dramatiq tasks bench.chaos_actors` CLIs that a supervisor restarts
whenever they exit, as a restart policy would. Jobs are enqueued at a steady rate over the run while chaos
strikes: SIGKILLs of worker processes (every other one of the whole process group), pg_terminate_backend of
the workers' connections every few seconds, one PostgreSQL restart, and one SIGSTOP longer than the lease
followed by SIGCONT. Then the queue drains and bench/chaos_report.py counts lost, executed-again, overlapping,
failed and stuck jobs, and the rescue latency. Exit code 0 when nothing was lost, overlapped, failed or stuck.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row

from bench.chaos_actors import CHAOS_ACTOR, CHAOS_QUEUE, EXECUTIONS_FILE_ENV
from bench.chaos_report import ChaosReport, analyse, read_executions
from broker.postgres import PostgresTransport
from broker.transport import NewJob
from service.migrate import apply_migrations

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a stopped container waits before it is started again (a restart policy's delay).
RESTART_DELAY_S = 0.5
#: Seconds the queue may take to drain once the chaos is over.
DRAIN_TIMEOUT_S = 240.0
#: Jobs per enqueue call.
ENQUEUE_BATCH = 50


class Container:
    """A `dramatiq` CLI that is started again whenever it exits, until stop()."""

    def __init__(self, name: str, env: dict[str, str], threads: int, work_dir: Path) -> None:
        self.name = name
        self.run_dir = work_dir / f"run-{name}"
        self.env = {**env, "RUN_DIR": str(self.run_dir), "HEALTH_CHECK_PORT": str(_free_port())}
        self.threads = threads
        self.log = (work_dir / f"{name}.log").open("ab")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name=f"container-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def worker_pids(self) -> list[int]:
        """Pids of this container's live worker processes, from their heartbeat files."""
        pids = []
        for path in self.run_dir.glob("worker-*.json"):
            try:
                pid = int(path.stem.removeprefix("worker-"))
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError):
                continue
            pids.append(pid)
        return pids

    def stop(self) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self._thread.join(10)
        self.log.close()

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            script = Path(sys.executable).with_name("dramatiq")
            command = [str(script), "tasks", "bench.chaos_actors", "--path", str(ROOT)]
            command += [
                "--processes",
                "1",
                "--threads",
                str(self.threads),
                "--worker-shutdown-timeout",
                "10000",
            ]
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.starts += 1
            self.proc.wait()
            if not self._stopping.is_set():
                self._stopping.wait(RESTART_DELAY_S)


def _signal_if_alive(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # a kill may have hit it meanwhile
        os.kill(pid, signum)


def _url_for(admin_url: str, database: str) -> str:
    """The admin URL pointed at another database: a postgresql:// URL, as DATABASE_URL must be."""
    return urlsplit(admin_url)._replace(path=f"/{database}").geturl()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Chaos:
    """The faults, on a schedule, and when each hit which process."""

    def __init__(self, containers: list[Container], admin_url: str, restart: Any, executions: Path) -> None:
        self.containers = containers
        self.executions = executions
        self.admin_url = admin_url
        self.restart_postgres = restart
        self.kills: dict[int, float] = {}
        self.stops: dict[int, float] = {}
        self.events: Counter[str] = Counter()
        self._random = random.Random(7)

    def kill(self, whole_group: bool) -> bool:
        """SIGKILL a worker process that is running a job (or its whole process group); False when none is.

        Only a worker in the middle of a job: a kill between jobs would cut nothing, and rescue is what the
        run is for.
        """
        running = {
            e.pid for e in read_executions(self.executions) if e.finished is None and e.interrupted is None
        }
        busy = [c for c in self.containers if running & set(c.worker_pids())]
        if not busy:
            return False
        container = self._random.choice(busy)
        pids = [pid for pid in container.worker_pids() if pid in running]
        proc = container.proc
        if not pids or proc is None or proc.poll() is not None:
            return False
        now = time.time()
        for pid in pids:
            self.kills[pid] = now
        if whole_group:
            os.killpg(proc.pid, signal.SIGKILL)
            self.events["SIGKILL process group"] += 1
        else:
            os.kill(pids[0], signal.SIGKILL)
            self.events["SIGKILL worker process"] += 1
        return True

    def terminate_connections(self) -> None:
        try:
            with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=2) as conn:
                row = conn.execute(
                    "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity"
                    " where application_name like 'queue-worker%%' and random() < 0.5"
                ).fetchone()
            self.events["pg_terminate_backend"] += int(row[0]) if row else 0
        except psycopg.Error:
            pass  # the server is restarting

    def stop_past_lease(self, lease_s: float) -> None:
        for container in self._random.sample(self.containers, len(self.containers)):
            pids = container.worker_pids()
            if pids:
                pid = pids[0]
                self.stops[pid] = time.time()
                os.kill(pid, signal.SIGSTOP)
                self.events["SIGSTOP past the lease"] += 1
                threading.Timer(lease_s + 5, _signal_if_alive, args=(pid, signal.SIGCONT)).start()
                return

    def restart(self) -> None:
        self.restart_postgres()
        self.events["PostgreSQL restart"] += 1


def run(args: argparse.Namespace) -> ChaosReport:
    work_dir = Path(tempfile.mkdtemp(prefix="chaos-"))
    server, admin_url, restart = _database(args, work_dir)
    try:
        database = f"chaos_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'create database "{database}"')
        url = _url_for(admin_url, database)
        apply_migrations(url, bootstrap=True)
        executions = work_dir / "executions.jsonl"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "DATABASE_URL": url,
            "APP_ENV": "production",
            "LOG_LEVEL": "info",
            "MAX_CONCURRENT_JOBS": str(args.threads),
            "JOB_LEASE_MS": str(args.lease_ms),
            "SHUTDOWN_TIMEOUT_MS": "5000",
            EXECUTIONS_FILE_ENV: str(executions),
        }
        containers = [Container(f"c{i}", env, args.threads, work_dir) for i in range(args.containers)]
        chaos = Chaos(containers, url, restart, executions)
        started = time.time()
        for container in containers:
            container.start()
        expected = _produce_with_chaos(args, url, chaos)
        _drain(url, expected, DRAIN_TIMEOUT_S + args.lease_ms / 1000)
        for container in containers:
            container.stop()
        with psycopg.connect(url, row_factory=dict_row) as conn:
            rows = conn.execute("select id, status from public.coding_jobs").fetchall()
        report = analyse(
            rows,
            expected,
            read_executions(executions),
            chaos.kills,
            chaos.stops,
            dict(chaos.events),
            time.time() - started,
        )
        print(f"logs and executions: {work_dir}", file=sys.stderr)
        return report
    finally:
        if server is not None:
            server.stop()


def _produce_with_chaos(args: argparse.Namespace, url: str, chaos: Chaos) -> set[str]:
    """Enqueue the jobs at a steady rate over the run while the chaos schedule strikes; the ids sent."""
    transport = PostgresTransport(url, pool_size=1)
    rng = random.Random(11)
    expected: set[str] = set()
    started = time.monotonic()
    next_kill = started + args.kill_every_s
    next_terminate = started + args.terminate_every_s
    restart_at = started + args.min_run_s * 0.3 if args.restart else None
    stop_at = started + args.min_run_s * 0.5 if args.stop else None
    kills = 0
    try:
        while True:
            now = time.monotonic()
            due = min(args.jobs, int(args.jobs * (now - started) / args.min_run_s) + ENQUEUE_BATCH)
            if len(expected) < due:
                batch = [
                    _new_job(rng.randint(*args.duration_ms))
                    for _ in range(min(ENQUEUE_BATCH, due - len(expected)))
                ]
                try:
                    transport.enqueue(batch)
                    expected.update(job.id for job in batch)
                except Exception as exc:  # the server is restarting: try again shortly
                    print(f"enqueue failed ({type(exc).__name__}); retrying", file=sys.stderr)
            if now >= next_kill and kills < args.kills:
                if chaos.kill(whole_group=kills % 2 == 1):
                    kills += 1
                    next_kill = now + args.kill_every_s
                else:
                    next_kill = now + 0.5  # no worker in the middle of a job right now: try again shortly
            if now >= next_terminate:
                chaos.terminate_connections()
                next_terminate = now + args.terminate_every_s
            if restart_at is not None and now >= restart_at:
                chaos.restart()
                restart_at = None
            if stop_at is not None and now >= stop_at:
                chaos.stop_past_lease(args.lease_ms / 1000)
                stop_at = None
            done = len(expected) >= args.jobs and kills >= args.kills and now - started >= args.min_run_s
            if done and restart_at is None and stop_at is None:
                return expected
            time.sleep(0.05)
    finally:
        transport.close()


def _new_job(duration_ms: int) -> NewJob:
    return NewJob(str(uuid.uuid4()), CHAOS_QUEUE, CHAOS_ACTOR, [], {"duration_ms": duration_ms}, {}, 0, 3)


def _drain(url: str, expected: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                row = conn.execute(
                    "select count(*) from public.coding_jobs where status not in ('completed', 'failed')"
                ).fetchone()
            if row is not None and row[0] == 0:
                return
        except psycopg.Error:
            pass
        time.sleep(0.5)


def _database(args: argparse.Namespace, work_dir: Path) -> tuple[Any, str, Any]:
    """(server to stop or None, admin URL, restart function)."""
    if args.database_url:

        def refuse() -> None:
            raise SystemExit("--database-url: the benchmark restarts only a server it started itself")

        return None, args.database_url, refuse
    from service.embedded_db import start_embedded_postgres, stop_embedded_postgres

    data_dir = work_dir / "postgres"
    server = start_embedded_postgres(data_dir)

    def restart() -> None:
        stop_embedded_postgres(data_dir)
        start_embedded_postgres(data_dir)

    class Server:
        def stop(self) -> None:
            stop_embedded_postgres(data_dir)

    return Server(), server.url, restart


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--containers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--min-run-s", type=float, default=120.0)
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--kill-every-s", type=float, default=5.0)
    parser.add_argument("--terminate-every-s", type=float, default=3.0)
    parser.add_argument("--duration-ms", type=int, nargs=2, default=(50, 500), metavar=("MIN", "MAX"))
    parser.add_argument("--lease-ms", type=int, default=60_000)
    parser.add_argument("--restart", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--stop", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--database-url", help="an admin URL to use instead of a server of its own (no restart)"
    )
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = parser.parse_args(argv)
    if args.database_url and args.restart:
        parser.error("--database-url needs --no-restart: only a server started here may be restarted")
    report = run(args)
    print(json.dumps(report.as_json(), indent=2) if args.json else report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
