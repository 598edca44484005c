"""The embedded PostgreSQL for development and tests: a real server from the `pgserver` wheel.

The server outlives the Python process that started it (the next process finds it running), so a
`dramatiq` worker's N processes, a demo producer and a test session may all call `start_embedded_postgres`
at once and share one server. An exclusive file lock beside the data directory serialises their starts.
"""

from __future__ import annotations

import fcntl
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from service.settings import Settings

#: The user pgserver's initdb creates (trust authentication on the unix socket only).
EMBEDDED_USER = "postgres"
#: seconds to wait for the stopped server's process to exit
STOP_TIMEOUT_S = 30


@dataclass
class EmbeddedPostgres:
    """A running embedded server: `url` reaches it over its unix socket."""

    data_dir: Path
    socket_dir: Path
    #: The server listens on no TCP address; the port only names the socket file, `.s.PGSQL.<port>`.
    port: int
    server: Any

    @property
    def url(self) -> str:
        # libpq's `host` parameter wins over the URL's host and names the socket directory; "localhost" is
        # there only so URL validators (pydantic's PostgresDsn) accept the URL.
        return (
            f"postgresql://{EMBEDDED_USER}@localhost:{self.port}/postgres"
            f"?host={quote(str(self.socket_dir), safe='')}"
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are ended); a later start finds the data intact."""
        pgserver = _import_pgserver()
        with _start_lock(self.data_dir):
            postmaster = self.server.get_postmaster_info().process
            pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=self.server.system_user)
            if postmaster is not None:
                # pg_ctl returns once postmaster.pid is gone, a moment before the process itself is.
                postmaster.wait(STOP_TIMEOUT_S)


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


def _import_pgserver() -> Any:
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset and falls back to a directory under /tmp,
    # which serves pgserver's lock file and, for deep data directories, its socket equally well.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*XDG_RUNTIME_DIR", category=UserWarning)
        import pgserver

    # pgserver logs every command it runs, with initdb's whole output, at INFO.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    return pgserver


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
        info = server.get_postmaster_info()
    # pgserver puts the socket in the data directory, or under the runtime directory when that path would
    # pass the unix socket limit (107 bytes on Linux, 103 on macOS).
    return EmbeddedPostgres(
        data_dir=data_dir, socket_dir=Path(info.socket_dir), port=info.port or 5432, server=server
    )


def ensure_embedded_database(settings: Settings) -> str:
    """Start the embedded server in `settings.embedded_database_dir`, migrate it, and return its URL."""
    from service.migrate import apply_migrations

    embedded = start_embedded_postgres(settings.embedded_database_dir)
    apply_migrations(embedded.url, bootstrap=True)
    return embedded.url
