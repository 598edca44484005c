"""Test databases: the local PostgreSQL server when it answers, the embedded one otherwise."""

from __future__ import annotations

import fcntl
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql

from service.migrate import apply_migrations

LOCAL_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: Kept between sessions (the server outlives them too), so only the first session pays for initdb.
EMBEDDED_DATA_DIR = Path(__file__).resolve().parents[2] / ".data" / "test-postgres"
#: seconds to wait for the local server to answer before falling back to the embedded one
LOCAL_CONNECT_TIMEOUT_S = 2


@dataclass
class DatabaseServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    admin_url: str
    embedded: object | None = None
    # One template per session: sessions running at once on the same server must not drop each other's.
    template_name: str = field(default_factory=lambda: f"queue_test_template_{uuid.uuid4().hex[:8]}")

    def url_for(self, name: str) -> str:
        """A postgresql:// URL to database `name`, usable as DATABASE_URL by the settings and psycopg."""
        info = psycopg.conninfo.conninfo_to_dict(self.admin_url)
        info["dbname"] = name
        return _as_url({key: str(value) for key, value in info.items() if value is not None})

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.admin_url, autocommit=True)

    def create_database(self, name: str) -> str:
        """An empty database; returns its URL."""
        with self._admin() as conn:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def create_template(self) -> None:
        self.drop(self.template_name)
        with self.cluster_lock():
            apply_migrations(self.create_database(self.template_name), bootstrap=True)

    @contextmanager
    def cluster_lock(self) -> Iterator[None]:
        """Held while migrations run: they change role settings, which are the whole server's, and two test
        processes (pytest-xdist workers) doing that at once collide on pg_db_role_setting."""
        info = psycopg.conninfo.conninfo_to_dict(self.admin_url)
        key = f"{info.get('host') or 'local'}-{info.get('port') or 5432}".replace("/", "_")
        path = Path(tempfile.gettempdir()) / f"queue-tests-cluster-{key}.lock"
        with path.open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def clone_template(self, name: str) -> str:
        with self._admin() as conn:
            conn.execute(
                sql.SQL("create database {} template {}").format(
                    sql.Identifier(name), sql.Identifier(self.template_name)
                )
            )
        return self.url_for(name)

    def drop(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))

    def close(self) -> None:
        self.drop(self.template_name)


def _as_url(info: dict[str, str]) -> str:
    params = dict(info)
    user, password = params.pop("user", ""), params.pop("password", "")
    dbname, host, port = params.pop("dbname", ""), params.pop("host", ""), params.pop("port", "")
    if host.startswith("/"):
        # A unix socket directory goes in libpq's `host` parameter, which wins over the URL's host;
        # "localhost" only keeps URL validators (pydantic's PostgresDsn) happy.
        params["host"] = host
        host = "localhost"
    userinfo = f"{quote(user, safe='')}{':' + quote(password, safe='') if password else ''}@" if user else ""
    netloc = f"{userinfo}{host}{':' + port if port else ''}"
    query = f"?{urlencode(params, quote_via=quote, safe='')}" if params else ""
    return f"postgresql://{netloc}/{quote(dbname, safe='')}{query}"


def _local_server_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=LOCAL_CONNECT_TIMEOUT_S):
            return True
    except psycopg.OperationalError:
        return False


def start_database_server() -> DatabaseServer:
    """Use TEST_DATABASE_URL or the local server; fall back to the embedded PostgreSQL."""
    url = os.environ.get("TEST_DATABASE_URL", LOCAL_SERVER_URL)
    if _local_server_answers(url):
        return DatabaseServer(admin_url=url)
    from service.embedded_db import start_embedded_postgres

    embedded = start_embedded_postgres(EMBEDDED_DATA_DIR)
    return DatabaseServer(admin_url=embedded.url, embedded=embedded)
