"""The dashboard in a real headless Chromium, behind a reverse proxy that serves it under a path prefix.

One browser session for every check: the page loads with its stylesheet and script (through the prefix), shows
jobs inserted by SQL, refuses a cancel without the token, signs in, cancels and retries, opens a job's page;
and a screenshot of the main page is taken (UPDATE_DOCS_SCREENSHOT=1 writes it to docs/dashboard.png).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from broker.postgres import PostgresTransport
from health.dashboard.app import create_dashboard_app
from tests.support.brokers import Db, insert_job, job, wait_until
from tests.support.browser import REQUIRE_BROWSER_ENV, BrowserMissing, Page, find_chromium, running_chromium
from tests.support.processes import REPO_ROOT
from tests.support.web import prefix_proxy, serving

pytestmark = pytest.mark.slow

TOKEN = "browser-token-" + uuid.uuid4().hex
#: The prefix the reverse proxy serves the dashboard under.
PREFIX = "/ops/queue"
#: Seconds any wait of this test may take.
TIMEOUT_S = 15
#: Milliseconds between the page's refreshes here (5 s in production).
REFRESH_MS = 300
#: Where the documentation's screenshot lives, and the switch that rewrites it.
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "dashboard.png"
UPDATE_SCREENSHOT_ENV = "UPDATE_DOCS_SCREENSHOT"


@pytest.fixture
def page() -> Iterator[Page]:
    try:
        find_chromium()
    except BrowserMissing as exc:
        if os.environ.get(REQUIRE_BROWSER_ENV):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    with running_chromium() as opened:
        yield opened


def seed(db: Db) -> dict[str, str]:
    """Jobs as the Edge Function inserts them, in every state, and an hour of history for the charts."""
    made = {
        "pending": insert_job(
            db, prompt="Add dark mode to the settings page", priority=10, user_id=uuid.uuid4()
        ),
        "failed": insert_job(db, prompt="Migrate the billing tables", actor_name="run_coding_job"),
        "running": insert_job(db, prompt="Write tests for the export module", queue_name="long"),
    }
    # A Free user (cap 1) with two sandbox jobs: one runs, the other waits for the user's own slot.
    free_user = uuid.uuid4()
    for step in ("Lint the repository", "Format the repository"):
        insert_job(db, prompt=step, queue_name="sandbox", priority=0, user_id=free_user)
    for n in range(6):
        insert_job(db, prompt=f"Fix lint warnings in package {n}", priority=(0, 5, 10)[n % 3])
    db.execute(
        "select public.register_worker('worker-a:4242:9f2c1e', 'heartbeat', 600000, 'worker-a', 4242,"
        " '{long,sandbox}')"
    )
    db.execute(
        "select * from public.claim_jobs('worker-a:4242:9f2c1e', 'long', 1, 600000, %s::uuid)",
        (str(uuid.uuid4()),),
    )
    sandbox = db.execute(
        "select id from public.claim_jobs('worker-a:4242:9f2c1e', 'sandbox', 2, 600000, %s::uuid)",
        (str(uuid.uuid4()),),
    ).fetchall()
    assert len(sandbox) == 1, "the Free cap lets one of the user's jobs start"
    db.execute(
        "update public.coding_jobs set status = 'failed', completed_at = now(), retry_count = 3,"
        " attempts = %s, error_message = 'RuntimeError: the sandbox ran out of memory' where id = %s",
        (
            json.dumps(
                [
                    {
                        "attempt": n,
                        "worker": "worker-b:17:aa01bc",
                        "outcome": "failed",
                        "error": "RuntimeError: OOM",
                    }
                    for n in (1, 2, 3, 4)
                ]
            ),
            made["failed"],
        ),
    )
    db.execute(
        """
        insert into public.queue_stat_minutes (minute, queue_name, status, entered, depth)
        select date_trunc('minute', now()) - m * interval '1 minute', 'default', s.status,
               case s.status when 'completed' then round(22 + 9 * sin(m / 8.0))
                             when 'failed' then (m % 11 = 3)::int else 0 end,
               case s.status when 'pending' then round(9 + 6 * sin(m / 7.0))
                             when 'processing' then round(3 + cos(m / 5.0)) end
          from generate_series(1, 59) m,
               unnest('{pending,processing,completed,failed}'::public.job_status[]) s(status)
        """
    )
    return made


def test_the_dashboard_works_in_a_real_browser_behind_a_path_prefix(
    db: Db, database_url: str, page: Page, tmp_path: Path
) -> None:
    made = seed(db)
    transport = PostgresTransport(database_url, pool_size=4)
    app = create_dashboard_app(transport, SecretStr(TOKEN), refresh_ms=REFRESH_MS)
    try:
        with serving(app) as upstream, prefix_proxy(int(upstream.rsplit(":", 1)[1]), PREFIX) as base:
            # When the page opens through the proxy's prefix
            page.open(base)

            # Then it shows the jobs inserted by SQL, with its own stylesheet, charts and live refresh working
            page.wait_for(f"document.querySelector('tr[data-job=\"{made['pending']}\"]')")
            assert "Add dark mode to the settings page" in page.text("#pending")
            assert "RuntimeError: the sandbox ran out of memory" in page.text("#failed")
            assert "worker-a:4242:9f2c1e" in page.text("#workers")
            # And fair share: the Free user runs one job and waits for its own slot with the other
            free = page.evaluate(
                "Array.from(document.querySelectorAll('#plans tr[data-plan=\"free\"] td.num'))"
                ".map(cell => cell.textContent)"
            )
            assert free[:6] == ["0\u20134", "1", "1", "1", "1", "1"], (
                free
            )  # priorities, cap, running, users, at cap, capped
            header = page.evaluate("getComputedStyle(document.querySelector('header')).backgroundColor")
            assert header == "rgb(24, 32, 46)", "the stylesheet loads through the prefix"
            assert page.evaluate("document.querySelectorAll('svg.chart').length") == 2
            page.wait_for(
                "document.body.dataset.refreshedAt", TIMEOUT_S
            )  # the script refreshed via the prefix

            # When Cancel is clicked without signing in
            page.click(f"tr[data-job='{made['pending']}'] button[data-action='cancel']")

            # Then it is refused, and nothing changed
            page.wait_for("document.querySelector('#message')")
            assert "Sign in with the dashboard token first" in page.text("#message")
            assert job(db, made["pending"])["status"] == "pending"

            # When the operator goes back and signs in with the token
            page.click("main.message a")
            page.wait_for("document.querySelector('#live') && document.querySelector('#sign-in')")
            page.evaluate(f"document.querySelector('input[name=token]').value = {json.dumps(TOKEN)}")
            page.click("#sign-in")
            page.wait_for("document.querySelector('#signed-in')")
            assert page.evaluate("location.pathname") == f"{PREFIX}/"

            # A screenshot of the main page, signed in, for the documentation
            page.wait_for("document.querySelectorAll('svg.chart rect').length > 0")
            shot = DOCS_SCREENSHOT if os.environ.get(UPDATE_SCREENSHOT_ENV) else tmp_path / "dashboard.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(shot)
            assert shot.stat().st_size > 10_000

            # Then Cancel and Retry work
            page.click(f"tr[data-job='{made['pending']}'] button[data-action='cancel']")
            wait_until(
                lambda: job(db, made["pending"])["status"] == "cancelled", TIMEOUT_S, "the job cancelled"
            )
            page.wait_for(
                f"document.querySelector('#cancelled tr[data-job=\"{made['pending']}\"]')", TIMEOUT_S
            )
            page.click(f"tr[data-job='{made['failed']}'] button[data-action='retry']")
            wait_until(lambda: job(db, made["failed"])["status"] == "pending", TIMEOUT_S, "the job retried")

            page.wait_for(f"document.querySelector('#pending tr[data-job=\"{made['failed']}\"]')", TIMEOUT_S)

            # And a job's page shows its attempts, through the prefix too
            page.click(f"tr[data-job='{made['running']}'] a.job")
            page.wait_for("document.querySelector('#job')")
            assert page.evaluate("location.pathname") == f"{PREFIX}/jobs/{made['running']}"
            assert "worker-a:4242:9f2c1e" in page.text("table.attempts")

    finally:
        transport.close()
