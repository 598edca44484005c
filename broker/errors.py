"""The broker's errors. Lost connections are dramatiq.errors.ConnectionClosed, so Dramatiq retries them."""

from __future__ import annotations

from dramatiq.errors import ConnectionClosed

__all__ = ["ConnectionClosed", "QueueAccessDenied", "QueueError", "QueueSchemaMissing"]


class QueueError(Exception):
    """Base class for the queue's own errors that no retry can fix."""


class QueueSchemaMissing(QueueError):
    """Raised when the queue's SQL functions are missing or stale: the migrations were not applied."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(
            "The queue's SQL functions are missing or out of date "
            f"({detail}). Apply the migrations: `python -m service.migrate` "
            "(or `supabase db push` on a Supabase project)."
        )


class QueueAccessDenied(QueueError):
    """Raised when the credentials may not run the queue functions (wrong key, or not service_role)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(
            f"The queue refused these credentials ({detail}). "
            "Use the service role key (SUPABASE_SERVICE_ROLE_KEY), not the anon key."
        )
