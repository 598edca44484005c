"""Who may act on the dashboard: whoever knows DASHBOARD_TOKEN; nobody while it is unset.

Signing in posts the token once; the dashboard then sets a session cookie holding an HMAC of the token (never
the token), HttpOnly and SameSite=Strict, scoped by the browser to the dashboard's own path (so it works
behind a reverse proxy's prefix). Each action's form also carries a CSRF value (another HMAC of the token),
shown only to a signed-in session. Scripts may send `Authorization: Bearer <token>` instead. Every comparison
is constant-time (hmac.compare_digest); a changed token ends every session.
"""

from __future__ import annotations

import hashlib
import hmac

import falcon
from pydantic import SecretStr

#: The session cookie's name.
SESSION_COOKIE = "queue_dashboard"
#: Seconds a session lasts.
SESSION_MAX_AGE_S = 12 * 3600


class DashboardAuth:
    """Checks sign-ins, sessions and CSRF values against the configured token."""

    def __init__(self, token: SecretStr | None) -> None:
        secret = token.get_secret_value() if token is not None else ""
        self._token = secret.encode() if secret else None

    @property
    def enabled(self) -> bool:
        """Whether actions are possible at all (a token is configured)."""
        return self._token is not None

    def token_matches(self, given: str) -> bool:
        if self._token is None:
            return False
        return hmac.compare_digest(given.encode(), self._token)

    def _derived(self, purpose: bytes) -> str:
        assert self._token is not None
        return hmac.new(self._token, b"queue-dashboard:" + purpose, hashlib.sha256).hexdigest()

    def session_value(self) -> str:
        return self._derived(b"session")

    def csrf_value(self) -> str:
        return self._derived(b"csrf")

    def signed_in(self, req: falcon.Request) -> bool:
        """A session cookie (or a bearer token) that matches the configured token."""
        if self._token is None:
            return False
        if self._bearer_matches(req):
            return True
        cookie = req.get_cookie_values(SESSION_COOKIE) or []
        return any(hmac.compare_digest(value.encode(), self.session_value().encode()) for value in cookie)

    def may_act(self, req: falcon.Request, csrf: str | None) -> bool:
        """A bearer token, or a signed-in session whose form carries its CSRF value."""
        if self._token is None:
            return False
        if self._bearer_matches(req):
            return True
        return (
            self.signed_in(req)
            and csrf is not None
            and hmac.compare_digest(csrf.encode(), self.csrf_value().encode())
        )

    def _bearer_matches(self, req: falcon.Request) -> bool:
        header = req.get_header("Authorization") or ""
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and bool(value) and self.token_matches(value.strip())


def set_session(resp: falcon.Response, auth: DashboardAuth, *, secure: bool) -> None:
    # No path: the browser scopes the cookie to the folder of the sign-in URL, the dashboard's root behind any
    # prefix a proxy adds.
    resp.set_cookie(
        SESSION_COOKIE,
        auth.session_value(),
        max_age=SESSION_MAX_AGE_S,
        secure=secure,
        http_only=True,
        same_site="Strict",
        path=None,
    )


def clear_session(resp: falcon.Response, *, secure: bool) -> None:
    resp.unset_cookie(SESSION_COOKIE, same_site="Strict", path=None)
