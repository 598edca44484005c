"""The dashboard's app over a real queue (Falcon's test client): what it shows, who may act, what it hides.
The real browser, behind a proxy's path prefix, is tests/acceptance/test_dashboard_browser.py."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from http.cookies import SimpleCookie

import pytest
from falcon import testing
from pydantic import SecretStr

from broker.errors import ConnectionClosed
from broker.postgres import PostgresTransport
from broker.transport import QueueStat, Transport
from health.dashboard.app import create_dashboard_app
from health.dashboard.auth import SESSION_COOKIE
from tests.support.brokers import Db, insert_job, job, user_at_the_free_cap

TOKEN = "dashboard-token-" + uuid.uuid4().hex
#: A prompt longer than any excerpt, with a marker at its end that must never be shown.
LONG_PROMPT = "Refactor the billing module " + "carefully " * 40 + "END-OF-PROMPT"


def jobs_to_show(db: Db) -> dict[str, str]:
    """A pending job with a long prompt, a failed one with its error, and a running one."""
    pending = insert_job(db, prompt=LONG_PROMPT, priority=10)
    failed = insert_job(db, prompt="failed one", actor_name="fetch")
    db.execute(
        "update public.coding_jobs set status = 'failed', completed_at = now(),"
        " error_message = 'ValueError: the upstream said no' where id = %s",
        (failed,),
    )
    running = insert_job(db, prompt="running one", queue_name="slow")
    db.execute("select public.register_worker('dash-worker', 'heartbeat', 600000, 'host', 7, '{slow}')")
    db.execute(
        "select * from public.claim_jobs('dash-worker', 'slow', 1, 60000, %s::uuid)", (str(uuid.uuid4()),)
    )
    return {"pending": pending, "failed": failed, "running": running}


def signed_in(client: testing.TestClient) -> tuple[dict[str, str], str]:
    """Sign in with the token; the session cookie, and the CSRF value the page's forms carry."""
    result = client.simulate_post(
        "/login", body=f"token={TOKEN}", content_type="application/x-www-form-urlencoded"
    )
    assert result.status_code == 303 and result.headers["location"] == "./"
    cookie = SimpleCookie(result.headers["set-cookie"])
    cookies = {SESSION_COOKIE: cookie[SESSION_COOKIE].value}
    page = client.simulate_get("/", cookies=cookies).text
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert match, "a signed-in page carries the CSRF value in its forms"
    return cookies, match.group(1)


def post(
    client: testing.TestClient, path: str, cookies: dict[str, str] | None = None, **form: str
) -> testing.Result:
    body = "&".join(f"{k}={v}" for k, v in form.items())
    return client.simulate_post(
        path, body=body, content_type="application/x-www-form-urlencoded", cookies=cookies or {}
    )


def test_the_main_page_shows_queues_jobs_and_workers_read_only(db: Db, transport: Transport) -> None:
    made = jobs_to_show(db)
    client = testing.TestClient(create_dashboard_app(transport, None))

    page = client.simulate_get("/")

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    for job_id in made.values():
        assert f'data-job="{job_id}"' in text
    assert "Refactor the billing module" in text and "END-OF-PROMPT" not in text  # prompts as excerpts
    assert "ValueError: the upstream said no" in text and "dash-worker" in text
    assert "Read-only: set DASHBOARD_TOKEN" in text and 'name="csrf"' not in text
    assert "<svg" in text  # the charts, drawn on the server
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    # its script's refresh, one job's page, the static files it ships
    assert f'data-job="{made["running"]}"' in client.simulate_get("/live").text
    detail = client.simulate_get(f"/jobs/{made['failed']}")
    assert detail.status_code == 200 and "ValueError: the upstream said no" in detail.text
    assert client.simulate_get(f"/jobs/{uuid.uuid4()}").status_code == 404
    assert client.simulate_get("/static/dashboard.js").status_code == 200
    assert client.simulate_get("/static/dashboard.css").status_code == 200


def test_the_main_page_shows_the_plans_and_fair_share(db: Db, transport: Transport) -> None:
    # Given a Free user at the cap (one job running, two waiting for it) and a plan without a cap
    user_at_the_free_cap(db)
    db.execute("select public.set_plan_limit('team', 7, null)")
    db.execute("select public.set_fairness(p_aging_step_ms => 60000)")
    client = testing.TestClient(create_dashboard_app(transport, None))

    # When anyone who may see the page looks at it, and at its refreshed part
    pages = [client.simulate_get(path).text for path in ("/", "/live")]

    # Then the plans panel shows each plan's tier, cap and users at it, and the fairness setting
    for text in pages:
        [panel] = re.findall(r'<section id="plans">.*?</section>', text)
        rows = {
            plan: re.findall(r"<t[dh][^>]*>([^<]*)</t[dh]>", row)
            for plan, row in re.findall(r'<tr data-plan="([^"]+)">(.*?)</tr>', panel)
        }
        assert list(rows) == ["free", "starter", "team", "pro"]
        # plan, priorities, cap, running jobs, running users, users at cap, capped pending, oldest wait
        assert rows["free"][:7] == ["free", "0&ndash;4", "1", "1", "1", "1", "2"] and rows["free"][7]
        assert rows["team"][:7] == ["team", "7&ndash;9", "no cap", "0", "0", "0", "0"]
        assert rows["pro"][1:3] == ["10", "5"]
        assert "Fair share is <b>on</b>; aging step 1 min 0 s" in panel
        assert "top tier after 10 &times; aging step (10 min 0 s)" in panel
        assert "<form" not in panel  # read-only: the CLI changes it

    db.execute("select public.set_fairness(false)")
    assert "Fair share is <b>off</b>" in client.simulate_get("/live").text


@pytest.fixture
def pg(database_url: str) -> Iterator[PostgresTransport]:
    transport = PostgresTransport(database_url, pool_size=2)
    try:
        yield transport
    finally:
        transport.close()


def test_without_a_token_every_action_is_refused(db: Db, pg: PostgresTransport) -> None:
    made = jobs_to_show(db)
    client = testing.TestClient(create_dashboard_app(pg, None))

    refused = post(client, "/actions/cancel", job_id=made["pending"])
    login = post(client, "/login", token="anything")
    bearer = client.simulate_post(
        "/actions/cancel",
        body=f"job_id={made['pending']}",
        content_type="application/x-www-form-urlencoded",
        headers={"Authorization": "Bearer anything"},
    )

    assert refused.status_code == 403 and "DASHBOARD_TOKEN is not set" in refused.text
    assert login.status_code == 403 and bearer.status_code == 403
    assert job(db, made["pending"])["status"] == "pending"


def test_actions_need_a_session_signed_in_with_the_token_and_its_csrf_value(
    db: Db, pg: PostgresTransport
) -> None:
    made = jobs_to_show(db)
    client = testing.TestClient(create_dashboard_app(pg, SecretStr(TOKEN)))

    # Not signed in, or signed in with a wrong token: refused
    assert post(client, "/actions/cancel", job_id=made["pending"]).status_code == 403
    assert post(client, "/login", token="not-the-token").status_code == 403
    assert "Sign in" in client.simulate_get("/").text

    # Signed in: the session cookie holds no token, is HttpOnly, SameSite=Strict, scoped by the browser
    login = post(client, "/login", token=TOKEN)
    raw = login.headers["set-cookie"]
    assert "HttpOnly" in raw and "SameSite=Strict" in raw and "Path=" not in raw and TOKEN not in raw
    cookies, csrf = signed_in(client)

    # A session's post without its CSRF value (what a forged cross-site form would send) is refused
    assert post(client, "/actions/cancel", cookies, job_id=made["pending"]).status_code == 403
    assert job(db, made["pending"])["status"] == "pending"

    # With it: cancel (pending, then running), retry, pause, resume, each back where it was asked
    done = post(client, "/actions/cancel", cookies, job_id=made["pending"], csrf=csrf)
    assert done.status_code == 303 and done.headers["location"] == "../"
    assert job(db, made["pending"])["status"] == "cancelled"
    post(client, "/actions/cancel", cookies, job_id=made["running"], csrf=csrf)
    assert job(db, made["running"])["cancel_requested_at"] is not None
    back = f"jobs/{made['failed']}"
    retried = post(client, "/actions/retry", cookies, job_id=made["failed"], csrf=csrf, back=back)
    assert retried.headers["location"] == f"../{back}"
    assert job(db, made["failed"])["status"] == "pending"
    post(client, "/actions/pause", cookies, queue="default", csrf=csrf)
    assert "paused" in client.simulate_get("/", cookies=cookies).text
    post(client, "/actions/resume", cookies, queue="default", csrf=csrf)
    assert pg.paused_queues() == []
    # An action the dashboard does not have is not found, whatever the form holds
    assert post(client, "/actions/purge", cookies, csrf=csrf).status_code == 404
    # An address outside the dashboard is never a way back
    assert (
        post(client, "/actions/pause", cookies, queue="x", csrf=csrf, back="https://evil.example/").headers[
            "location"
        ]
        == "../"
    )

    # A script may use the token as a bearer token instead
    bearer = client.simulate_post(
        "/actions/retry",
        body=f"job_id={made['pending']}",
        content_type="application/x-www-form-urlencoded",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert bearer.status_code == 303 and job(db, made["pending"])["status"] == "pending"

    # A cookie that is not the session's is no session; signing out clears the cookie
    assert "Sign in" in client.simulate_get("/", cookies={SESSION_COOKIE: "forged"}).text
    out = post(client, "/logout", cookies)
    assert out.status_code == 303 and out.headers["set-cookie"].startswith(f'{SESSION_COOKIE}=""; expires=')


def test_no_secret_ever_appears(db: Db, database_url: str, pg: PostgresTransport) -> None:
    made = jobs_to_show(db)
    client = testing.TestClient(create_dashboard_app(pg, SecretStr(TOKEN)))
    cookies, _ = signed_in(client)

    pages = [
        client.simulate_get(path, cookies=cookies)
        for path in ("/", "/live", *(f"/jobs/{job_id}" for job_id in made.values()))
    ]
    pages.append(post(client, "/login", token="wrong"))

    for page in pages:
        everything = page.text + str(page.headers)
        assert TOKEN not in everything
        assert database_url not in everything


class Unreachable(PostgresTransport):
    def stats(self) -> list[QueueStat]:
        # What a driver says names the host, port and user: for the log, never for an anonymous page.
        raise ConnectionClosed(OSError('connection to server at "db.internal" (10.0.0.7), port 6543 failed'))  # type: ignore[no-untyped-call]


def test_an_unreachable_queue_is_a_503_page_not_a_traceback(database_url: str) -> None:
    transport = Unreachable(database_url, pool_size=1)
    try:
        page = testing.TestClient(create_dashboard_app(transport, None)).simulate_get("/")
    finally:
        transport.close()
    assert page.status_code == 503 and "The queue did not answer" in page.text
    assert "Traceback" not in page.text
    assert "db.internal" not in page.text and "6543" not in page.text


def test_a_jobs_page_shows_its_idempotency_key_and_periodic_tick(db: Db, transport: Transport) -> None:
    keyed = insert_job(db, prompt="keyed", idempotency_key="request-7f3a")
    periodic = insert_job(
        db, actor_name="refresh_usage", options={"periodic_tick": "2026-12-02T09:00:00+00:00"}
    )
    client = testing.TestClient(create_dashboard_app(transport, None))

    keyed_page = client.simulate_get(f"/jobs/{keyed}").text
    periodic_page = client.simulate_get(f"/jobs/{periodic}").text

    assert "Idempotency key" in keyed_page and "request-7f3a" in keyed_page
    assert "Periodic tick" in periodic_page and "2026-12-02T09:00:00+00:00" in periodic_page
