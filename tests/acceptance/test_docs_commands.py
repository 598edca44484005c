"""Every command block of README.md and WORKER_SERVICE.md runs as written, against plain PostgreSQL.

The blocks run in the order the documents give them, in one copy of the repository (so `cp .env.example .env`
and `.data/` land there, not here) that uses the project's `.venv`. Each shell block gets a fresh, empty
database on the local server (plain PostgreSQL: no auth schema in it), given as DATABASE_URL as the documents
ask; a Python block is a snippet for a queue already set up, and uses the database of the shell block before
it. A block that ends by starting the worker runs until the queue has nothing left to do (the test adds one
job, as the Edge Function would, so each worker has work), then gets Ctrl-C and must exit 0; any other block
must exit 0 on its own. SKIPPED lists the blocks not run here, each with its reason.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.support.databases import DatabaseServer
from tests.support.processes import REPO_ROOT, CliProcess, free_port, insert_edge_jobs, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cluster_lock")]

DOCUMENTS = ("README.md", "WORKER_SERVICE.md")
SHELL = frozenset({"sh", "bash", "shell"})
#: Blocks not run here, by their first line, and why.
SKIPPED = {
    "python3 scripts/dev.py test": "it is this test suite; CI runs exactly it (.ci/run)",
    "docker build -t queue-worker .": "needs a Docker engine (../shared/tools/container-check runs it)",
}
#: Commands that run until stopped: the worker, one way or another.
LONG_RUNNING = ("scripts/dev.py run", "service.launch", "dramatiq tasks")
#: Seconds a block may take to exit on its own, or to finish the queue's work, or to stop after Ctrl-C.
BLOCK_S = 120.0
STOP_S = 30.0


@dataclass(frozen=True)
class Block:
    document: str
    line: int
    language: str
    text: str

    @property
    def first_line(self) -> str:
        return self.text.strip().splitlines()[0].strip()

    def __str__(self) -> str:
        return f"{self.document}:{self.line} ({self.first_line})"


def command_blocks() -> list[Block]:
    """The shell and Python blocks of the documents, in order, with their fence's indentation removed."""
    blocks: list[Block] = []
    fence = re.compile(r"^(?P<indent>\s*)```(?P<language>\w*)\s*$")
    for document in DOCUMENTS:
        lines = (REPO_ROOT / document).read_text().splitlines()
        index = 0
        while index < len(lines):
            opening = fence.match(lines[index])
            index += 1
            if opening is None:
                continue
            indent, language, start, body = len(opening["indent"]), opening["language"], index, []
            while index < len(lines) and not fence.match(lines[index]):
                body.append(lines[index][indent:])
                index += 1
            index += 1  # the closing fence
            if language in SHELL or language == "python":
                blocks.append(Block(document, start, language, "\n".join(body) + "\n"))
    return blocks


@pytest.fixture
def repository_copy(tmp_path: Path) -> Path:
    """The repository's files (tracked and new, not ignored) in a folder of their own, with the real .venv."""
    copy = tmp_path / "repository"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            target.chmod(source.stat().st_mode)
    (copy / ".venv").symlink_to(REPO_ROOT / ".venv")
    return copy


@pytest.fixture
def fresh_databases(database_server: DatabaseServer) -> Iterator[Callable[[], str]]:
    """Makes new, empty databases on the local server (no auth schema, no queue); drops them at the end."""
    names: list[str] = []

    def create() -> str:
        names.append(f"test_docs_{uuid.uuid4().hex[:12]}")
        return database_server.create_database(names[-1])

    try:
        yield create
    finally:
        for name in names:
            database_server.drop(name)


def test_every_command_block_runs_as_written(
    repository_copy: Path, fresh_databases: Callable[[], str], tmp_path: Path
) -> None:
    # `dev.py run` in the copy reuses .venv only while its setup is current; otherwise it would reinstall the
    # project from the copy into the real .venv. `python3 scripts/dev.py test` makes it current.
    assert setup_is_current(), "the .venv is not set up for this checkout: run `python3 scripts/dev.py test`"
    blocks = command_blocks()
    assert {block.first_line for block in blocks} >= set(SKIPPED), "a skipped block is gone: update SKIPPED"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "HEALTH_CHECK_PORT": str(free_port()),
        "RUN_DIR": str(tmp_path / "run"),
        "POLL_INTERVAL_MS": "500",
        "CODING_JOB_DURATION_MS": "200",
    }
    ran: list[Block] = []
    for number, block in enumerate(blocks):
        if block.first_line in SKIPPED:
            continue
        if block.language in SHELL:
            env["DATABASE_URL"] = fresh_databases()
        run_block(block, repository_copy / f"docs_block_{number}", env, env["DATABASE_URL"], repository_copy)
        ran.append(block)

    # The ones that set up and run the service were among them
    assert [block.first_line.split("#")[0].strip() for block in ran] == [
        "python3 scripts/dev.py run",
        "import uuid",
        "import dramatiq",
        "cp .env.example .env",
        "import uuid",  # batch enqueue
        "import dramatiq",  # an actor that checks should_stop()
        "import dramatiq",  # periodic actors and a unique send
    ]


def run_block(block: Block, script: Path, env: dict[str, str], database_url: str, cwd: Path) -> None:
    if block.language == "python":
        script.with_suffix(".py").write_text(block.text)
        command = [str(cwd / ".venv" / "bin" / "python"), script.with_suffix(".py").name]
    else:
        script.with_suffix(".sh").write_text(block.text)
        command = ["bash", "-e", script.with_suffix(".sh").name]
    process = CliProcess(command, env, cwd)
    try:
        if not any(word in block.text for word in LONG_RUNNING):
            code = process.wait(BLOCK_S)
            assert code == 0, f"{block} exited {code}:\n{process.tail()}"
            return
        # A worker: give it a job once the queue exists, wait until nothing is left to do, then Ctrl-C
        completed_before = completed(database_url)
        wait_until(lambda: queue_exists(database_url) or process.popen.poll() is not None, BLOCK_S)
        assert process.popen.poll() is None, f"{block} ended early:\n{process.tail()}"
        with psycopg.connect(database_url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
            insert_edge_jobs(conn, 1)
        wait_until(
            lambda: idle_after(database_url, completed_before) or process.popen.poll() is not None,
            BLOCK_S,
            message=f"{block}: every job completed",
        )
        assert process.popen.poll() is None, f"{block} ended early:\n{process.tail()}"
        process.signal_group(signal.SIGINT)
        code = process.wait(STOP_S)
        assert code == 0, f"{block} exited {code} after Ctrl-C:\n{process.tail()}"
    finally:
        process.kill()


def queue_exists(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return conn.execute("select to_regclass('public.coding_jobs') is not null").fetchone() == (True,)


def completed(url: str) -> int:
    if not queue_exists(url):
        return 0
    with psycopg.connect(url) as conn:
        row = conn.execute("select count(*) from public.coding_jobs where status = 'completed'").fetchone()
    return int(row[0]) if row else 0


def idle_after(url: str, completed_before: int) -> bool:
    """True once this block's worker completed something and every job is completed."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "select count(*) filter (where status = 'completed'), count(*) from public.coding_jobs"
        ).fetchone()
    assert row is not None
    done, total = int(row[0]), int(row[1])
    return done > completed_before and done == total


def setup_is_current() -> bool:
    """What scripts/dev.py checks before it skips its setup: the lock file's and pyproject's fingerprint."""
    digest = hashlib.sha256()
    for name in ("requirements-dev.lock", "pyproject.toml"):
        digest.update((REPO_ROOT / name).read_bytes())
    stamp = REPO_ROOT / ".venv" / ".dev-setup.sha256"
    return stamp.is_file() and stamp.read_text().strip() == digest.hexdigest()
