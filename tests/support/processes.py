"""Real `dramatiq` CLI processes for acceptance tests: start, read their output, signal, always clean up.

Every wait here has a deadline, and `WorkerProcesses.close()` kills each started process group, so a test
that fails halfway never leaves a worker behind to claim jobs from the next test's database.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The CLI installed beside the interpreter running the tests (the project's virtualenv).
DRAMATIQ_CLI = Path(sys.executable).parent / "dramatiq"
#: seconds to wait for a killed process group to be reaped at teardown
KILL_WAIT_S = 10.0
T = TypeVar("T")
#: seconds to wait for the output reader after the process exited (children may hold the pipe a moment)
READER_JOIN_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cli_env(database_url: str | None, *, app_env: str = "production", **settings: object) -> dict[str, str]:
    """A clean environment for the CLI: PATH and HOME, the database, APP_ENV and the given settings.

    Keyword names are settings in lower case (`poll_interval_ms=200`); None leaves a setting unset.
    Nothing else leaks in from the test runner's environment.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    env["APP_ENV"] = app_env
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    for name, value in settings.items():
        if value is not None:
            env[name.upper()] = str(value)
    return env


def with_credentials(url: str, user: str, password: str) -> str:
    """The postgresql:// URL with its user and password replaced (the database, host and query kept)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def dramatiq_args(
    *modules: str, processes: int = 1, threads: int = 1, shutdown_timeout_ms: int = 10_000
) -> list[str]:
    """`dramatiq tasks [modules] --processes P --threads T --worker-shutdown-timeout MS`."""
    return [
        str(DRAMATIQ_CLI),
        "tasks",
        *modules,
        "--path",
        str(REPO_ROOT),
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--worker-shutdown-timeout",
        str(shutdown_timeout_ms),
    ]


class CliProcess:
    """One running CLI (its own process group) whose merged stdout and stderr lines are collected."""

    def __init__(self, args: list[str], env: Mapping[str, str], cwd: Path) -> None:
        self.args = args
        self.started_at = time.monotonic()
        # A new session: the CLI and every worker it forks share one process group that teardown can kill.
        self.popen = subprocess.Popen(
            args,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, name=f"cli-output-{self.pid}", daemon=True)
        self._reader.start()

    # -- output -----------------------------------------------------------------------------------------
    def _read(self) -> None:
        stream = self.popen.stdout
        assert stream is not None
        try:
            for line in stream:
                with self._cond:
                    self._lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        """A snapshot of the lines read so far."""
        with self._cond:
            return list(self._lines)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def tail(self, count: int = 40) -> str:
        return "\n".join(self.lines[-count:])

    def wait_for_line(self, pattern: str, timeout_s: float, *, start: int = 0) -> tuple[int, str]:
        """The index and text of the first line from `start` on that matches `pattern` (a regex).

        Fails the test with the output's tail when none appears within `timeout_s` or the output ends.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        index = start
        with self._cond:
            while True:
                while index < len(self._lines):
                    if regex.search(self._lines[index]):
                        return index, self._lines[index]
                    index += 1
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    reason = "the output ended" if self._eof else f"{timeout_s:.1f} s passed"
                    raise AssertionError(
                        f"no line matching {pattern!r}: {reason}; last lines:\n{self.tail()}"
                    )
                self._cond.wait(remaining)

    def wait_for_lines(self, pattern: str, count: int, timeout_s: float) -> list[str]:
        """The first `count` lines matching `pattern`, waiting at most `timeout_s` in all."""
        deadline = time.monotonic() + timeout_s
        found: list[str] = []
        start = 0
        while len(found) < count:
            index, line = self.wait_for_line(pattern, max(deadline - time.monotonic(), 0.0), start=start)
            found.append(line)
            start = index + 1
        return found

    def json_lines(self) -> list[dict[str, Any]]:
        """The lines that parse as JSON objects (in production every line should)."""
        parsed: list[dict[str, Any]] = []
        for line in self.lines:
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                parsed.append(value)
        return parsed

    # -- lifecycle --------------------------------------------------------------------------------------
    def send(self, signum: signal.Signals) -> None:
        """Send a signal to the CLI's main process only, as an orchestrator does."""
        self.popen.send_signal(signum)

    def signal_group(self, signum: signal.Signals) -> None:
        """Send a signal to the whole process group, as a terminal's Ctrl-C does."""
        os.killpg(self.pid, signum)

    def wait(self, timeout_s: float) -> int:
        """The exit code; fails the test with the output's tail when the CLI still runs at the deadline."""
        try:
            code = self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the CLI (pid {self.pid}) did not exit within {timeout_s:.1f} s; last lines:\n{self.tail()}"
            ) from None
        self._reader.join(READER_JOIN_S)
        return code

    def stop(self, signum: signal.Signals, timeout_s: float) -> tuple[int, float]:
        """Signal the main process and wait for it: (exit code, seconds from signal to exit)."""
        sent_at = time.monotonic()
        self.send(signum)
        code = self.wait(timeout_s)
        return code, time.monotonic() - sent_at

    def child_pids(self) -> list[int]:
        """The pids of the CLI's direct children (worker and fork processes), from `pgrep -P`."""
        result = subprocess.run(
            ["pgrep", "-P", str(self.pid)], capture_output=True, text=True, timeout=5, check=False
        )
        return [int(pid) for pid in result.stdout.split()]

    def kill(self) -> None:
        """SIGKILL the whole process group and reap the main process; safe to call more than once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=KILL_WAIT_S)
        self._reader.join(READER_JOIN_S)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


class WorkerProcesses:
    """Starts CLI processes for one test and kills every one of them at the end, whatever happened."""

    def __init__(self, cwd: Path) -> None:
        # Not the repository root: a developer's .env there must not leak into the tests' settings.
        self.cwd = cwd
        self._started: list[CliProcess] = []

    def start(
        self,
        env: Mapping[str, str],
        *modules: str,
        processes: int = 1,
        threads: int = 1,
        shutdown_timeout_ms: int = 10_000,
    ) -> CliProcess:
        """The stock `dramatiq tasks` CLI with these flags; the settings agree with them unless `env` says
        otherwise (a test of a flag that differs from its setting sets the setting in `env`)."""
        args = dramatiq_args(
            *modules, processes=processes, threads=threads, shutdown_timeout_ms=shutdown_timeout_ms
        )
        matching = {
            "WORKER_PROCESSES": str(processes),
            "MAX_CONCURRENT_JOBS": str(threads),
            "SHUTDOWN_TIMEOUT_MS": str(shutdown_timeout_ms),
        }
        return self._run(args, {**matching, **env})

    def launch(self, env: Mapping[str, str], *extra: str) -> CliProcess:
        """`python -m service.launch [extra]`: the container's command, with its flags from the settings."""
        args = [sys.executable, "-m", "service.launch", *extra]
        return self._run(args, {"PYTHONPATH": str(REPO_ROOT), **env})

    def _run(self, args: list[str], env: Mapping[str, str]) -> CliProcess:
        # Heartbeat files go to a folder of this test's own, and the health server to a port of its own.
        own = {"RUN_DIR": str(self.cwd / "run"), "HEALTH_CHECK_PORT": str(free_port())}
        process = CliProcess(args, {**own, **env}, self.cwd)
        self._started.append(process)
        return process

    def close(self) -> None:
        for process in self._started:
            process.kill()

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def wait_until(
    condition: Callable[[], T], timeout_s: float, *, interval_s: float = 0.1, message: str = "condition"
) -> T:
    """Poll `condition()` until it returns a truthy value, which is returned; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} not met within {timeout_s:.1f} s (last value: {value!r})")
        time.sleep(interval_s)


def iter_json(lines: list[str]) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """Each line with its parsed JSON object, or None when it is not one."""
    for line in lines:
        try:
            value = json.loads(line)
        except ValueError:
            yield line, None
            continue
        yield line, value if isinstance(value, dict) else None


# -- the rows the CLI works on (dict-row connections, like the `db` fixture) ---------------------------
Rows = psycopg.Connection[dict[str, Any]]


def insert_edge_jobs(conn: Rows, count: int, *, priority: int = 0) -> list[str]:
    """Insert `count` jobs the way the Edge Function does (domain columns only); returns their ids."""
    rows = conn.execute(
        "insert into public.coding_jobs (session_id, project_id, user_id, prompt, priority)"
        " select gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 'prompt ' || n, %s"
        "   from generate_series(1, %s) as n"
        " returning id::text as id",
        (priority, count),
    ).fetchall()
    return [str(row["id"]) for row in rows]


def status_counts(conn: Rows) -> dict[str, int]:
    """How many rows are in each status."""
    rows = conn.execute(
        "select status::text as status, count(*) as jobs from public.coding_jobs group by 1"
    ).fetchall()
    return {str(row["status"]): int(row["jobs"]) for row in rows}


def job_rows(conn: Rows) -> dict[str, dict[str, Any]]:
    """Every row's id -> its state columns, with `lease_in_future` judged by the database's clock."""
    rows = conn.execute(
        "select id::text as id, status::text as status, retry_count, rescue_count, error_message, locked_by,"
        " claim_token, lease_expires_at, completed_at, session_id::text as session_id,"
        " coalesce(lease_expires_at > now(), false) as lease_in_future"
        " from public.coding_jobs"
    ).fetchall()
    return {str(row["id"]): row for row in rows}


def pid_of_worker_id(worker_id: str) -> int:
    """The process id inside a broker worker id (`host:pid:random`)."""
    return int(worker_id.rsplit(":", 2)[1])
