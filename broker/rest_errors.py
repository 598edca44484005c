"""Errors of the Supabase REST API, translated at the boundary into the queue's own errors.

postgrest-py raises `APIError` with PostgREST's body but drops the HTTP status, and the status is what tells
a gateway's 401 or 503 from a database error. So the transport's httpx client carries `raise_for_rest_status`
as a response hook: every non-2xx response becomes `RestCallFailed(status, body)` before postgrest-py sees it.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from postgrest import APIError

from broker.errors import ConnectionClosed, QueueAccessDenied, QueueError, QueueSchemaMissing

#: PostgREST codes for a function it cannot find or cannot choose (migrations missing, stale schema cache),
#: and PostgreSQL's for a function or table missing inside the call.
SCHEMA_MISSING_CODES = frozenset({"PGRST202", "PGRST203", "42883", "42P01"})
#: PostgREST codes for a refused JWT or role, and PostgreSQL's "permission denied".
ACCESS_DENIED_CODES = frozenset({"PGRST300", "PGRST301", "PGRST302", "42501"})
#: Statuses worth retrying besides 5xx: the gateway's rate limit.
TRANSIENT_STATUSES = frozenset({429})


def connection_closed(detail: str) -> ConnectionClosed:
    """A ConnectionClosed saying which call was lost and how."""
    return ConnectionClosed(detail)


class RestCallFailed(Exception):
    """Raised by the response hook for a non-2xx answer; carries the status and PostgREST's error body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.code = str(body.get("code") or "")
        self.message = str(body.get("message") or body.get("msg") or body.get("error") or "")
        self.hint = body.get("hint")
        super().__init__(f"HTTP {status} {self.code}: {self.message}")


class QueueRpcError(QueueError):
    """Raised when a queue RPC fails for a reason no retry fixes; `status` and `code` say which."""

    def __init__(self, function: str, status: int, code: str, message: str) -> None:
        self.function = function
        self.status = status
        self.code = code
        super().__init__(
            f"{function} failed with HTTP {' '.join(filter(None, (str(status), code)))}: {message}"
        )


def raise_for_rest_status(response: httpx.Response) -> None:
    """httpx response hook: turn a non-2xx answer into RestCallFailed, with the body read and parsed."""
    if response.is_success:
        return
    response.read()
    try:
        body = json.loads(response.content or b"{}")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        # Not PostgREST's JSON: a proxy's error page. Keep a short excerpt, never the request.
        body = {"message": response.text[:200].strip() or response.reason_phrase}
    raise RestCallFailed(response.status_code, body)


def translate(function: str, exc: Exception) -> Exception:
    """The queue's error for a failed RPC; the key never appears in any of these texts."""
    if isinstance(exc, httpx.TransportError):  # connect/read/write errors and timeouts, lost replies
        return connection_closed(f"{function}: {type(exc).__name__}: {exc or 'no detail'}")
    if isinstance(exc, APIError):  # a 2xx that postgrest-py could not use
        return QueueRpcError(function, 200, exc.code or "", exc.message or str(exc))
    if not isinstance(exc, RestCallFailed):
        return exc
    detail = f"{function}: HTTP {exc.status} {exc.code} {exc.message}".strip()
    if exc.code in SCHEMA_MISSING_CODES or (exc.status == 404 and not exc.code):
        return QueueSchemaMissing(detail)
    if exc.code in ACCESS_DENIED_CODES or exc.status in (401, 403):
        return QueueAccessDenied(detail)
    if exc.status >= 500 or exc.status in TRANSIENT_STATUSES:
        return connection_closed(detail)
    return QueueRpcError(function, exc.status, exc.code, exc.message)
