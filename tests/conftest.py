"""Shared fixtures: one migrated template database per session, a fresh clone per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.support.databases import DatabaseServer, start_database_server


@pytest.fixture(scope="session")
def database_server() -> Iterator[DatabaseServer]:
    """The running PostgreSQL at 127.0.0.1:5432 when there is one, the embedded one otherwise."""
    server = start_database_server()
    try:
        server.create_template()
        yield server
    finally:
        server.close()


@pytest.fixture
def database_url(database_server: DatabaseServer) -> Iterator[str]:
    """A superuser URL to a fresh database cloned from the migrated template."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = database_server.clone_template(name)
    try:
        yield url
    finally:
        database_server.drop(name)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[dict[str, object]]]:
    """An autocommit connection to the test's database, returning rows as dicts."""
    from psycopg.rows import dict_row

    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def cluster_lock(database_server: DatabaseServer) -> Iterator[None]:
    """For tests that apply migrations or change role settings: never at once with another test process's."""
    with database_server.cluster_lock():
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    """Reports whose captured output holds a lone surrogate (tests of unstorable error text log some) are
    escaped: pytest-xdist's workers send reports as UTF-8 and would crash on it."""
    report: pytest.TestReport = yield
    report.sections = [(title, _utf8_safe(content)) for title, content in report.sections]
    return report


def _utf8_safe(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
