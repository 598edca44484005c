"""The connection budget (service/budget.py) and the tables WORKER_SERVICE.md builds from it."""

from __future__ import annotations

import re
from pathlib import Path

from service.budget import container_connections, worker_pool_size

DOC = Path(__file__).resolve().parents[2] / "WORKER_SERVICE.md"
#: Supabase's guidance: what share of the database's connections a deployment may count on (see the doc).
DIRECT_SHARE = 0.8
SESSION_POOL_SHARE = 0.4


def doc_table(heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after `heading` in WORKER_SERVICE.md."""
    text = DOC.read_text(encoding="utf-8")
    after = text[text.index(heading) :]
    rows = [line for line in after.splitlines() if line.startswith("|")]
    table: list[list[str]] = []
    for line in rows[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table.append(cells)
        # the table ends at the first line that is not a row
        following = after[after.index(line) + len(line) :].splitlines()[1:2]
        if not following or not following[0].startswith("|"):
            break
    return table


def number(cell: str) -> int:
    return int(re.sub(r"[^0-9]", "", cell))


def test_a_worker_process_pool_grows_with_threads_only_a_little() -> None:
    assert worker_pool_size(1) == 2
    assert worker_pool_size(4) == worker_pool_size(64) == 3


def test_two_default_containers_fit_a_session_pool_of_ten() -> None:
    # The image's default: one process, one thread
    assert 2 * container_connections(1, 1, listen=True) <= 10
    # The 2 x 4 containers fit with one pooled connection per process
    assert 2 * container_connections(2, 4, listen=True, pool_size=1) <= 10


def test_the_per_container_table_matches_the_budget() -> None:
    rows = doc_table("### Connections of one container")
    assert rows, "the table must be there"
    for shape, direct, transaction, *_ in rows:
        match = re.match(r"(\d+) process(?:es)? x (\d+) threads?(?:, DATABASE_POOL_SIZE=(\d+))?", shape)
        assert match, shape
        processes, threads = int(match[1]), int(match[2])
        pool_size = int(match[3]) if match[3] else None
        expected = (
            container_connections(processes, threads, listen=True, pool_size=pool_size),
            container_connections(processes, threads, listen=False, pool_size=pool_size),
        )
        assert (number(direct), number(transaction)) == expected, shape


def test_the_supabase_plan_table_matches_the_budget() -> None:
    rows = doc_table("### How many containers fit a Supabase project")
    assert len(rows) >= 8
    small = (container_connections(1, 1, listen=True), container_connections(1, 1, listen=False))
    large = (container_connections(2, 4, listen=True), container_connections(2, 4, listen=False))
    for compute, max_connections, max_clients, direct, session, transaction in rows:
        db, clients = number(max_connections), number(max_clients)
        expected = [
            (int(db * DIRECT_SHARE) // small[0], int(db * DIRECT_SHARE) // large[0]),
            (int(db * SESSION_POOL_SHARE) // small[0], int(db * SESSION_POOL_SHARE) // large[0]),
            (clients // small[1], clients // large[1]),
        ]
        found = [tuple(number(part) for part in cell.split("/")) for cell in (direct, session, transaction)]
        assert found == expected, compute
