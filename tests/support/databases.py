"""Test databases: the local PostgreSQL server when it answers, the embedded one otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psycopg
from psycopg import sql

from service.migrate import apply_migrations

LOCAL_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TEMPLATE_NAME = "queue_test_template"


@dataclass
class DatabaseServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    admin_url: str
    embedded: object | None = None

    def url_for(self, name: str) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.admin_url)
        info["dbname"] = name
        return psycopg.conninfo.make_conninfo(**{k: v for k, v in info.items() if v is not None})

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.admin_url, autocommit=True)

    def create_template(self) -> None:
        with self._admin() as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(TEMPLATE_NAME)))
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(TEMPLATE_NAME)))
        apply_migrations(self.url_for(TEMPLATE_NAME), bootstrap=True)

    def clone_template(self, name: str) -> str:
        with self._admin() as conn:
            conn.execute(
                sql.SQL("create database {} template {}").format(sql.Identifier(name), sql.Identifier(TEMPLATE_NAME))
            )
        return self.url_for(name)

    def drop(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))

    def close(self) -> None:
        self.drop(TEMPLATE_NAME)


def _local_server_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def start_database_server() -> DatabaseServer:
    """Use TEST_DATABASE_URL or the local server; fall back to the embedded PostgreSQL."""
    url = os.environ.get("TEST_DATABASE_URL", LOCAL_SERVER_URL)
    if _local_server_answers(url):
        return DatabaseServer(admin_url=url)
    from service.embedded_db import start_embedded_postgres

    embedded = start_embedded_postgres(os.path.join(".data", "test-postgres"))
    return DatabaseServer(admin_url=embedded.url, embedded=embedded)
