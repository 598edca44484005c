"""The dashboard's Falcon app: pages, the live part its script refreshes, sign-in, and the actions."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import falcon
from loguru import logger
from pydantic import SecretStr

from broker.errors import ConnectionClosed, QueueError
from broker.operator_records import RETRYABLE_STATUSES, JobFilter
from broker.transport import Transport
from health.dashboard.auth import DashboardAuth, clear_session, set_session
from health.dashboard.board import read_board
from health.dashboard.views import REFRESH_MS, Viewer, home_page, job_page, live_part, message_page

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Bytes a form post may carry.
MAX_FORM_BYTES = 16_384
#: What a page may load and do: its own files only, nothing inline, never inside a frame.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
#: Where an action may send the browser back to, relative to the dashboard's root.
_BACK = re.compile(r"^(jobs/[0-9a-f-]{36})?$")
#: Longest queue name an action accepts.
MAX_QUEUE_CHARS = 200


class Dashboard:
    """What every resource shares: the transport and the sign-in rules."""

    def __init__(self, transport: Transport, auth: DashboardAuth, refresh_ms: int) -> None:
        self.transport = transport
        self.auth = auth
        self.refresh_ms = refresh_ms

    def viewer(self, req: falcon.Request) -> Viewer:
        signed_in = self.auth.signed_in(req)
        return Viewer(
            actions_enabled=self.auth.enabled,
            signed_in=signed_in,
            csrf=self.auth.csrf_value() if signed_in else None,
        )


def _html(resp: falcon.Response, text: str, status: str = falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_HTML
    resp.text = text


def _form(req: falcon.Request) -> dict[str, str]:
    length = req.content_length or 0
    if length > MAX_FORM_BYTES:
        raise falcon.HTTPContentTooLarge()
    raw = req.bounded_stream.read(length).decode("utf-8", "replace") if length else ""
    return {key: values[0] for key, values in parse_qs(raw, keep_blank_values=True).items()}


def _secure(req: falcon.Request) -> bool:
    return req.scheme == "https" or (req.get_header("X-Forwarded-Proto") or "").lower() == "https"


class HomeResource:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        board = read_board(self.dashboard.transport)
        _html(resp, home_page(board, self.dashboard.viewer(req), self.dashboard.refresh_ms))


class LiveResource:
    """The main page's changing part, for its script to swap in."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _html(resp, live_part(read_board(self.dashboard.transport), self.dashboard.viewer(req)))


class JobResource:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: uuid.UUID) -> None:
        viewer = self.dashboard.viewer(req)
        job = self.dashboard.transport.get_job(str(job_id))
        if job is None:
            page = message_page("No such job", f"No job {job_id}.", root="../", viewer=viewer)
            _html(resp, page, falcon.HTTP_404)
            return
        _html(resp, job_page(job, viewer, datetime.now(UTC)))


class LoginResource:
    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        auth = self.dashboard.auth
        if not auth.token_matches(_form(req).get("token", "")):
            refused = logger.bind(event="dashboard_refused", remote=req.remote_addr)
            refused.warning("Dashboard sign-in refused")
            reason = "That is not the dashboard token." if auth.enabled else "DASHBOARD_TOKEN is not set."
            viewer = self.dashboard.viewer(req)
            _html(resp, message_page("Not signed in", reason, root="", viewer=viewer), falcon.HTTP_403)
            return
        set_session(resp, auth, secure=_secure(req))
        resp.status = falcon.HTTP_303
        resp.location = "./"


class LogoutResource:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        clear_session(resp, secure=_secure(req))
        resp.status = falcon.HTTP_303
        resp.location = "./"


class ActionResource:
    """POST actions/{name}: cancel or retry a job, pause or resume a queue; then back where it was asked."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        form = _form(req)
        viewer = self.dashboard.viewer(req)
        if not self.dashboard.auth.may_act(req, form.get("csrf")):
            reason = (
                "Sign in with the dashboard token first."
                if self.dashboard.auth.enabled
                else "Actions are off: DASHBOARD_TOKEN is not set."
            )
            logger.bind(event="dashboard_refused", action=name, remote=req.remote_addr).warning(
                "Dashboard action {} refused", name
            )
            _html(resp, message_page("Refused", reason, root="../", viewer=viewer), falcon.HTTP_403)
            return
        done = self._act(name, form)
        logger.bind(event="dashboard_action", action=name, remote=req.remote_addr).info("Dashboard: {}", done)
        back = form.get("back", "")
        resp.status = falcon.HTTP_303
        resp.location = "../" + (back if _BACK.match(back) else "")

    def _act(self, name: str, form: dict[str, str]) -> str:
        if name not in ("cancel", "retry", "pause", "resume"):
            raise falcon.HTTPNotFound()
        transport = self.dashboard.transport
        if name in ("cancel", "retry"):
            job_id = _job_id(form.get("job_id", ""))
            if name == "cancel":
                [outcome] = transport.cancel([job_id], "from the dashboard")
                return f"cancel {job_id}: {outcome.outcome}"
            job = transport.get_job(job_id)
            if job is None or job.status not in RETRYABLE_STATUSES:
                raise falcon.HTTPConflict(description=f"job {job_id} is not failed or cancelled")
            retried = transport.retry_jobs(JobFilter(status=job.status, job_ids=(job_id,)))
            return f"retry {job_id}: {len(retried)} retried"
        queue = form.get("queue", "")
        if not queue or len(queue) > MAX_QUEUE_CHARS:
            raise falcon.HTTPBadRequest(description="a queue name is needed")
        if name == "pause":
            transport.pause_queue(queue, "paused from the dashboard")
            return f"pause {queue}"
        transport.resume_queue(queue)
        return f"resume {queue}"


def _job_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise falcon.HTTPBadRequest(description="not a job id") from None


class SecurityHeaders:
    """Falcon middleware: the same protective headers on every response."""

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        for name, value in SECURITY_HEADERS.items():
            if name == "Cache-Control" and req.path.startswith("/static/"):
                continue
            resp.set_header(name, value)


#: The viewer of an error page: no session, no forms.
NOBODY = Viewer(actions_enabled=False, signed_in=False, csrf=None)


def _root(req: falcon.Request) -> str:
    """The dashboard's root relative to this request's page ("" for /x, "../" for /jobs/x)."""
    return "../" * max(req.path.count("/") - 1, 0)


def _unreachable(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict[str, Any]) -> None:
    # The detail (a driver names host, port and user) goes to the log, which redacts; the page is public.
    logger.bind(event="dashboard_error").warning("Dashboard: the queue did not answer: {}", ex)
    detail = f"{type(ex).__name__}; the worker's log has the detail. Try again in a moment."
    page = message_page("The queue did not answer", detail, root=_root(req), viewer=NOBODY)
    _html(resp, page, falcon.HTTP_503)


def _error_page(req: falcon.Request, resp: falcon.Response, exception: falcon.HTTPError) -> None:
    """Falcon's errors (404, 405, 400 ...) as the dashboard's own page, not XML or JSON."""
    page = message_page(
        exception.title or "Error", exception.description or exception.title, root=_root(req), viewer=NOBODY
    )
    resp.content_type = falcon.MEDIA_HTML
    resp.text = page


def create_dashboard_app(
    transport: Transport, token: SecretStr | None, *, refresh_ms: int = REFRESH_MS
) -> falcon.App[falcon.Request, falcon.Response]:
    """The dashboard over a transport; actions need `token` (none: read-only). The main page refreshes its
    live part every `refresh_ms`."""
    dashboard = Dashboard(transport, DashboardAuth(token), refresh_ms)
    app = falcon.App(middleware=[SecurityHeaders()])
    app.add_route("/", HomeResource(dashboard))
    app.add_route("/live", LiveResource(dashboard))
    app.add_route("/jobs/{job_id:uuid}", JobResource(dashboard))
    app.add_route("/login", LoginResource(dashboard))
    app.add_route("/logout", LogoutResource())
    app.add_route("/actions/{name}", ActionResource(dashboard))
    app.add_static_route("/static", STATIC_DIR)
    app.set_error_serializer(_error_page)
    app.add_error_handler(ConnectionClosed, _unreachable)
    app.add_error_handler(QueueError, _unreachable)
    return app
