"""The transport interface: the queue's operations in its own words, whatever carries them."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

#: Called by a doorbell with a queue name and the earliest run time in epoch milliseconds;
#: a queue name of None means "anything may have changed" (after a (re)subscribe).
RingCallback = Callable[[str | None, int], None]


@dataclasses.dataclass(frozen=True, slots=True)
class NewJob:
    """A Dramatiq message on its way into the queue."""

    id: str
    queue_name: str
    actor_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    priority: int
    max_retries: int
    delay_ms: int = 0

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A row this worker holds: its message fields as stored, the claim token and its domain ids."""

    id: str
    claim_token: str
    queue_name: str
    actor_name: str
    args: Any
    kwargs: Any
    options: Any
    priority: int
    retry_count: int
    max_retries: int
    created_at: datetime
    session_id: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ClaimedJob:
        created_at = row["created_at"]
        if isinstance(created_at, str):
            created_at = datetime.fromisoformat(created_at)
        session_id = row.get("session_id")
        return cls(
            id=str(row["id"]),
            claim_token=str(row["claim_token"]),
            queue_name=row["queue_name"],
            actor_name=row["actor_name"],
            args=row["args"],
            kwargs=row["kwargs"],
            options=row["options"],
            priority=row["priority"],
            retry_count=row["retry_count"],
            max_retries=row["max_retries"],
            created_at=created_at,
            session_id=str(session_id) if session_id is not None else None,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """The handle that fences every later change of a claimed job."""

    job_id: str
    claim_token: str


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStat:
    """One line of get_queue_stats(): the jobs of one queue in one status."""

    queue_name: str
    status: str
    jobs: int
    oldest_created_at: datetime | None
    next_run_at: datetime | None


class Doorbell(abc.ABC):
    """Wakes idle consumers when jobs arrive; a hint only, polling stays the fallback."""

    @abc.abstractmethod
    def start(self, ring: RingCallback) -> None:
        """Start listening in the background; call `ring` for each arrival and after each (re)subscribe."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop listening and release the connection."""


class Transport(abc.ABC):
    """The queue's operations. Lost connections raise dramatiq.errors.ConnectionClosed."""

    @abc.abstractmethod
    def check_schema(self) -> None:
        """Raise QueueSchemaMissing when the queue functions are not installed."""

    @abc.abstractmethod
    def enqueue(self, jobs: Sequence[NewJob]) -> int:
        """Insert messages; an id seen before is ignored. Returns how many were inserted."""

    @abc.abstractmethod
    def claim(self, worker_id: str, queue_name: str, limit: int, lease_ms: int) -> list[ClaimedJob]:
        """Claim up to `limit` due jobs of one queue, highest priority first, then oldest."""

    @abc.abstractmethod
    def complete_many(self, claims: Sequence[Claim]) -> set[str]:
        """Mark held jobs completed in one call; returns the ids completed by these claims."""

    def complete(self, claim: Claim) -> bool:
        """Mark a held job completed; False when the claim was lost."""
        return claim.job_id in self.complete_many([claim])

    @abc.abstractmethod
    def retry(self, claim: Claim, delay_ms: int, error: str, options: dict[str, Any]) -> bool:
        """Put a held job back to pending after `delay_ms`, counting a retry; False if the claim was lost."""

    @abc.abstractmethod
    def dead_letter(self, claim: Claim, error: str) -> bool:
        """Mark a held job failed with its error; False when the claim was lost."""

    @abc.abstractmethod
    def release(self, claims: Sequence[Claim]) -> int:
        """Return held jobs that never started to pending, with no retry counted."""

    @abc.abstractmethod
    def extend_leases(self, claims: Sequence[Claim], lease_ms: int) -> set[str]:
        """Extend the leases of held jobs; returns the ids still held."""

    @abc.abstractmethod
    def requeue_expired_leases(self, queue_name: str | None = None) -> int:
        """Return jobs whose holder stopped renewing the lease to pending (counting a retry), or fail them."""

    @abc.abstractmethod
    def purge(self, queue_name: str) -> int:
        """Delete the pending jobs of a queue."""

    @abc.abstractmethod
    def stats(self) -> list[QueueStat]:
        """The queue's counts by queue and status."""

    @abc.abstractmethod
    def ping(self, timeout_s: float) -> None:
        """Answer within `timeout_s` or raise ConnectionClosed: the readiness check."""

    @abc.abstractmethod
    def doorbell(self) -> Doorbell | None:
        """The wake-up source for this transport, or None in poll-only mode."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""
