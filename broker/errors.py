"""The broker's errors. Lost connections are dramatiq.errors.ConnectionClosed, so Dramatiq retries them."""

from __future__ import annotations

from dramatiq.errors import ConnectionClosed

__all__ = ["ConnectionClosed", "QueueAccessDenied", "QueueError", "QueueSchemaMissing"]

#: What to do when the REST API refuses the key.
SERVICE_ROLE_HINT = "Use the service role key (SUPABASE_SERVICE_ROLE_KEY), not the anon key."
#: What to do when the database refuses the login of DATABASE_URL.
DATABASE_LOGIN_HINT = (
    "Check the user, the password and the database name in DATABASE_URL; restarting will not fix this."
)


class QueueError(Exception):
    """Base class for the queue's own errors that no retry can fix."""


class QueueSchemaMissing(QueueError):
    """Raised when the queue's SQL functions are missing or stale: the migrations were not applied."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(
            "The queue's SQL functions are missing or out of date "
            f"({detail}). Apply the migrations: `python -m service.migrate --bootstrap` on plain "
            "PostgreSQL, `python -m service.migrate` (or `supabase db push`) on a Supabase project."
        )


class QueueAccessDenied(QueueError):
    """Raised when the queue refuses the credentials: a refused login, a wrong key, a role without grants."""

    def __init__(self, detail: str, hint: str = SERVICE_ROLE_HINT) -> None:
        self.detail = detail
        super().__init__(f"The queue refused these credentials ({detail}). {hint}")
