"""A real PgBouncer (Debian's package) in front of the test PostgreSQL: the stand-in for Supabase's pooler.

Each `PgBouncer` has its own configuration and log in a temporary folder, listens on a free port of
127.0.0.1, forwards every database name to the test server, and is stopped (never the PostgreSQL behind it)
when the test ends. It runs in transaction mode (Supavisor's port 6543) or session mode (port 5432) with a
pool of `pool_size` server connections per database and user, as the issue's reproduction did (10).

PgBouncer hands out idle server connections last-in first-out (`server_round_robin = 0`, its default), so a
client that starts a transaction right after another one finished gets the same server connection: tests use
that to look at what a client left behind on a pooled connection. The admin console (`admin()`) answers
`SHOW POOLS`, `SHOW CLIENTS`, `SHOW SERVERS` and `SHOW STATS`.

The tests install nothing: `.ci/run` installs the package; without it these fixtures fail with that advice.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row

from tests.support.processes import free_port

#: Where Debian puts the binary (not on a normal user's PATH).
DEBIAN_BINARY = Path("/usr/sbin/pgbouncer")
#: Seconds PgBouncer may take to listen, and to stop.
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
#: Server connections per database and user, as in the issue's reproduction.
DEFAULT_POOL_SIZE = 10
#: Seconds a client may wait for a server connection before PgBouncer refuses it (PgBouncer's default is 120).
DEFAULT_QUERY_WAIT_TIMEOUT_S = 30
#: Users a test may connect as: with `auth_type = trust` PgBouncer still wants them in its auth file.
USERS = ("postgres", "service_role", "authenticator")
TRANSACTION = "transaction"
SESSION = "session"


class PgBouncerMissing(RuntimeError):
    """Raised when PgBouncer is not installed; `.ci/run` installs it."""


def pgbouncer_binary() -> Path:
    """The pgbouncer executable, or PgBouncerMissing saying how to install it."""
    found = shutil.which("pgbouncer")
    if found is not None:
        return Path(found)
    if DEBIAN_BINARY.exists():
        return DEBIAN_BINARY
    raise PgBouncerMissing(
        "pgbouncer is not installed: run .ci/run, or `apt-get install -y pgbouncer` (Debian's package)"
    )


class PgBouncer:
    """One running PgBouncer; `url(database_url)` is that database's URL through it."""

    def __init__(
        self,
        server_url: str,
        *,
        mode: str = TRANSACTION,
        pool_size: int = DEFAULT_POOL_SIZE,
        query_wait_timeout_s: int = DEFAULT_QUERY_WAIT_TIMEOUT_S,
    ) -> None:
        if mode not in (TRANSACTION, SESSION):
            raise ValueError(f"unknown pool mode {mode!r}")
        self.mode = mode
        self.pool_size = pool_size
        self.port = free_port()
        server = psycopg.conninfo.conninfo_to_dict(server_url)
        self._server_host = str(server.get("host") or "127.0.0.1")
        self._server_port = str(server.get("port") or "5432")
        self.folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self.log_path = self.folder / "pgbouncer.log"
        self._write_config(query_wait_timeout_s)
        self._process: subprocess.Popen[bytes] | None = None

    def _write_config(self, query_wait_timeout_s: int) -> None:
        users = "".join(f'"{user}" ""\n' for user in USERS)
        (self.folder / "userlist.txt").write_text(users, encoding="utf-8")
        config = f"""
[databases]
* = host={self._server_host} port={self._server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.folder / "userlist.txt"}
admin_users = postgres
stats_users = postgres
pool_mode = {self.mode}
default_pool_size = {self.pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 500
query_wait_timeout = {query_wait_timeout_s}
server_round_robin = 0
ignore_startup_parameters = extra_float_digits
"""
        (self.folder / "pgbouncer.ini").write_text(config, encoding="utf-8")
        # PgBouncer refuses to run as root; as root it runs as `nobody`, who must read these files.
        self.folder.chmod(0o755)
        for path in self.folder.iterdir():
            path.chmod(0o644)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> PgBouncer:
        command = [str(pgbouncer_binary())]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]
        command.append(str(self.folder / "pgbouncer.ini"))
        log = self.log_path.open("wb")
        try:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._listening():
            if self._process.poll() is not None or time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"PgBouncer did not start; its log:\n{self.log()}")
            time.sleep(0.02)
        return self

    def _listening(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.2)
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM: immediate shutdown, clients and servers closed) and remove its folder."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        shutil.rmtree(self.folder, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"

    # -- URLs and the admin console --------------------------------------------------------------------
    def url(self, database_url: str) -> str:
        """`database_url` (a postgresql:// URL of the test server) with PgBouncer's host and port."""
        parts = urlsplit(database_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @contextmanager
    def admin(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """A connection to PgBouncer's admin console (simple protocol only, autocommit)."""
        conn = psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/pgbouncer",
            autocommit=True,
            row_factory=dict_row,
            prepare_threshold=None,
        )
        try:
            yield conn
        finally:
            conn.close()

    def show(self, what: str) -> list[dict[str, Any]]:
        """The rows of `SHOW <what>` (POOLS, CLIENTS, SERVERS, STATS, ...)."""
        if not what.isalpha():
            raise ValueError(f"not a SHOW command: {what!r}")
        with self.admin() as conn:
            cur = conn.cursor()
            cur.execute(f"show {what}".encode())
            return cur.fetchall()

    def clients(self, database: str) -> list[dict[str, Any]]:
        """PgBouncer's client connections to `database` (its own admin connection excluded)."""
        return [row for row in self.show("clients") if row["database"] == database]

    def servers(self, database: str) -> list[dict[str, Any]]:
        """PgBouncer's server connections to `database`."""
        return [row for row in self.show("servers") if row["database"] == database]

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def running_pgbouncer(server_url: str, **options: Any) -> Iterator[PgBouncer]:
    """A started PgBouncer in front of `server_url`'s server, stopped on the way out."""
    with PgBouncer(server_url, **options) as bouncer:
        yield bouncer


#: What a server session carries that a transaction pooler would hand to the next client.
SESSION_STATE_SQL = """
select pg_backend_pid() as pid,
       current_setting('statement_timeout') as statement_timeout,
       (select count(*) from pg_catalog.pg_prepared_statements)::int as prepared_statements,
       array(select pg_catalog.pg_listening_channels()) as listening,
       (select count(*) from pg_catalog.pg_locks l
         where l.locktype = 'advisory' and l.pid = pg_backend_pid())::int as advisory_locks
"""


def pooled_sessions(bouncer: PgBouncer, database_url: str) -> list[dict[str, Any]]:
    """The session state of every server connection `bouncer` keeps for the database, read through it.

    One client per server connection, each holding a transaction open at the same time, so the pooler has
    to hand each of them a different server connection: together they see every one.
    """
    database = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    count = len(bouncer.servers(str(database)))
    conns = [
        psycopg.connect(
            bouncer.url(database_url), autocommit=True, prepare_threshold=None, row_factory=dict_row
        )
        for _ in range(count)
    ]
    try:
        for conn in conns:
            conn.execute("begin")
        sessions = [conn.execute(SESSION_STATE_SQL).fetchone() for conn in conns]
        for conn in conns:
            conn.execute("rollback")
    finally:
        for conn in conns:
            conn.close()
    found = [session for session in sessions if session is not None]
    assert len({session["pid"] for session in found}) == count, f"not one client per server: {found}"
    return found


def leftovers(sessions: list[dict[str, Any]], default_statement_timeout: str) -> list[dict[str, Any]]:
    """The sessions that carry anything a client left behind."""
    return [
        session
        for session in sessions
        if session["statement_timeout"] != default_statement_timeout
        or session["prepared_statements"]
        or session["listening"]
        or session["advisory_locks"]
    ]
