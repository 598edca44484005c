"""The embedded PostgreSQL for development and tests: a real server from the optional `pgserver` wheel.

Only explicit development commands start it (`python -m service.migrate` without a DATABASE_URL,
`python3 scripts/dev.py run`, the test suite when no local server answers); workers and producers only look
for one already running (`find_embedded_postgres`, which needs no pgserver), so none of them starts a
database by surprise. The server outlives the process that started it, so a worker's processes, a demo
producer and a test session share one server; an exclusive file lock beside the data directory serialises
starts and stops.

    python -m service.embedded_db status|stop     (EMBEDDED_DATABASE_DIR of the settings)

`status` exits 0 when it runs, 1 when it does not, 3 when the settings use another database.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

#: The user pgserver's initdb creates (trust authentication on the unix socket only).
EMBEDDED_USER = "postgres"
#: seconds to wait for a stopped server's process to exit
SERVER_STOP_TIMEOUT_S = 30
#: seconds between checks while waiting for the server to stop
STOP_POLL_S = 0.05
#: How to get pgserver where it is missing: production images leave it out.
INSTALL_HINT = (
    "the embedded PostgreSQL needs the `embedded` extra: pip install 'supabase-queue-worker[embedded]' "
    "(python3 scripts/dev.py installs it)"
)
#: The 1-based lines of postmaster.pid we read (PostgreSQL's LOCK_FILE_LINE_*): pid, port, socket directory.
_PID_LINE, _PORT_LINE, _SOCKET_DIR_LINE = 1, 4, 5


class EmbeddedDatabaseUnavailable(RuntimeError):
    """Raised when the embedded PostgreSQL cannot be started here (pgserver is not installed)."""


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A running embedded server: `url` reaches it over its unix socket."""

    data_dir: Path
    socket_dir: Path
    #: The server listens on no TCP address; the port only names the socket file, `.s.PGSQL.<port>`.
    port: int
    #: The postmaster's process id.
    pid: int

    @property
    def url(self) -> str:
        # libpq's `host` parameter wins over the URL's host and names the socket directory; "localhost" is
        # there only so URL validators (pydantic's PostgresDsn) accept the URL.
        return (
            f"postgresql://{EMBEDDED_USER}@localhost:{self.port}/postgres"
            f"?host={quote(str(self.socket_dir), safe='')}"
        )


def find_embedded_postgres(data_dir: str | Path) -> EmbeddedPostgres | None:
    """The server running on `data_dir`, read from its postmaster.pid; None when none runs. Starts nothing."""
    data_dir = Path(data_dir).expanduser().resolve()
    try:
        lines = (data_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        pid = int(lines[_PID_LINE - 1])
        port = int(lines[_PORT_LINE - 1])
        socket_dir = lines[_SOCKET_DIR_LINE - 1].strip()
    except (OSError, ValueError, IndexError):
        return None
    if not socket_dir or not _running(pid):
        return None  # a file left by a crash, or a server that listens on no socket
    return EmbeddedPostgres(data_dir=data_dir, socket_dir=Path(socket_dir), port=port, pid=pid)


def start_embedded_postgres(data_dir: str | Path) -> EmbeddedPostgres:
    """Start the server on `data_dir` (initialising it the first time), or join the one already running."""
    pgserver = _import_pgserver()
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with _start_lock(data_dir):
        data_dir.mkdir(exist_ok=True)
        # cleanup_mode=None: the server stays up when this process exits, for the other processes using it.
        server = pgserver.get_server(data_dir, cleanup_mode=None)
        # pgserver hands out one cached handle per data directory and process, which may predate a stop:
        # this re-reads postmaster.pid and starts the server only when it is not running.
        server.ensure_postgres_running()
    # pgserver puts the socket in the data directory, or under the runtime directory when that path would
    # pass the unix socket limit (107 bytes on Linux, 103 on macOS); postmaster.pid says which.
    found = find_embedded_postgres(data_dir)
    if found is None:
        raise EmbeddedDatabaseUnavailable(f"the embedded PostgreSQL in {data_dir} did not start")
    return found


def stop_embedded_postgres(data_dir: str | Path) -> bool:
    """Stop the server on `data_dir` if one runs (fast shutdown: sessions end, data stays); True if it did."""
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        return False
    with _start_lock(data_dir):
        running = find_embedded_postgres(data_dir)
        if running is None:
            return False
        # SIGINT is PostgreSQL's "fast shutdown", what `pg_ctl stop -m fast` sends; no pgserver needed.
        os.kill(running.pid, signal.SIGINT)
        deadline = time.monotonic() + SERVER_STOP_TIMEOUT_S
        while (data_dir / "postmaster.pid").exists() or _running(running.pid):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the embedded PostgreSQL (pid {running.pid}) did not stop")
            time.sleep(STOP_POLL_S)
    return True


@contextmanager
def _start_lock(data_dir: Path) -> Iterator[None]:
    # A sibling file, not one inside the data directory: initdb wants that directory empty.
    lock_path = data_dir.with_name(f".{data_dir.name}.lock")
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _running(pid: int) -> bool:
    """True while `pid` exists and has not ended (a zombie has ended; its parent may never reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): the signal check above is all there is
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def _import_pgserver() -> Any:
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset and falls back to a directory under /tmp,
    # which serves pgserver's lock file and, for deep data directories, its socket equally well.
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*XDG_RUNTIME_DIR", category=UserWarning)
            import pgserver
    except ImportError:
        raise EmbeddedDatabaseUnavailable(INSTALL_HINT) from None

    # pgserver logs every command it runs, with initdb's whole output, at INFO.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    return pgserver


def main(argv: list[str]) -> int:
    """`python -m service.embedded_db status|stop`."""
    from service.errors import ConfigurationError
    from service.settings import load_settings

    if argv not in (["status"], ["stop"]):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    data_dir = Path(settings.embedded_database_dir).resolve()
    if argv == ["status"] and not settings.uses_embedded_database:
        print("The settings use another database than the embedded PostgreSQL")
        return 3
    if argv == ["stop"]:
        if stop_embedded_postgres(data_dir):
            print(f"Stopped the embedded PostgreSQL in {data_dir}")
        else:
            print(f"No embedded PostgreSQL runs in {data_dir}")
        return 0
    running = find_embedded_postgres(data_dir)
    print(f"The embedded PostgreSQL in {data_dir} is {'running' if running else 'not running'}")
    return 0 if running else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
