"""The transport interface: the queue's operations in its own words, whatever carries them."""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol

from broker.operations import QueueOperations

#: How a worker tells the queue it is alive: a session advisory lock that PostgreSQL drops the moment the
#: session ends (direct or session-pooled connections), or heartbeats (transaction poolers, the REST API).
PresenceMode = Literal["lock", "heartbeat"]

#: Called by a doorbell with a queue name and the earliest run time in epoch milliseconds (this host's clock);
#: a queue name of None means "anything may have changed" (after a (re)subscribe).
RingCallback = Callable[[str | None, int], None]

#: Called by a doorbell with the id of a job whose cancellation was asked for (its holder stops it).
CancelCallback = Callable[[str], None]


def ring_due_at_ms(payload: dict[str, Any]) -> int:
    """When a ring's earliest job is due, in epoch milliseconds by this host's clock.

    A ring says how long until then by the database's clock (`delay_ms`), so a host whose clock runs behind
    the database's neither waits for a job due now nor claims a delayed one early; rings of the previous
    version say only `run_at`, by the database's clock (none: due now). Raises TypeError or ValueError for a
    value that is not a number.
    """
    delay_ms = payload.get("delay_ms")
    if delay_ms is not None:
        return int(time.time() * 1000) + max(int(delay_ms), 0)
    return int(payload.get("run_at") or 0)


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
        # Not dataclasses.asdict: that deep-copies args, kwargs and options, a third of a send's Python time.
        return {
            "id": self.id,
            "queue_name": self.queue_name,
            "actor_name": self.actor_name,
            "args": self.args,
            "kwargs": self.kwargs,
            "options": self.options,
            "priority": self.priority,
            "max_retries": self.max_retries,
            "delay_ms": self.delay_ms,
        }


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
    prompt: str | None = None

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
            prompt=row.get("prompt"),
        )


#: The columns of a claimed row the worker reads: ClaimedJob's fields, each named as its column. A claim asks
#: for these only, not the whole row (a retried job's error text alone can be 8,000 characters).
CLAIMED_COLUMNS = tuple(field.name for field in dataclasses.fields(ClaimedJob))


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
    #: Pending jobs only: the run time of the longest-waiting job that is due (delayed jobs do not count).
    oldest_due_at: datetime | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker process as the registry shows it."""

    worker_id: str
    hostname: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class PresencePolicy:
    """How a transport's workers show they are alive, and how soon a silent one counts as dead."""

    mode: PresenceMode
    #: Seconds between a worker's heartbeats (each also runs the rescue of dead workers' jobs).
    heartbeat_interval_s: float
    #: Milliseconds a heartbeat worker may stay silent before its jobs are rescued.
    stale_after_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatReply:
    """What the queue answers a heartbeat."""

    #: False when the worker is not in the registry (declared dead): it must register again.
    registered: bool
    #: Ids of the given jobs the worker still holds.
    held: frozenset[str]
    #: Jobs this heartbeat's rescue returned to the queue (dead workers', expired leases).
    rescued: int
    #: Ids of the held jobs whose cancellation was asked for (the doorbell may have been missed).
    cancel_requested: frozenset[str] = frozenset()


class PresenceListener(Protocol):
    """Told by a lock-presence doorbell when its session holds the worker's lock, and when it lost it."""

    def session_up(self) -> None: ...

    def session_down(self, reason: str) -> None: ...


class Doorbell(abc.ABC):
    """Wakes idle consumers when jobs arrive; a hint only, polling stays the fallback.

    A doorbell of a lock-presence transport also keeps the worker's registration: its connection holds the
    worker's session advisory lock, and it tells its PresenceListener when that holds and when it is lost.
    """

    @abc.abstractmethod
    def start(self, ring: RingCallback, cancel: CancelCallback | None = None) -> None:
        """Start listening in the background; call `ring` for each arrival and after each (re)subscribe,
        and `cancel` with the id of each job whose cancellation was asked for."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop listening and release the connection."""

    def reregister(self) -> None:  # noqa: B027 -- only lock-presence doorbells register
        """The registry dropped this worker: register again on a fresh session (lock presence only)."""

    @property
    def alive(self) -> bool:
        """Whether its background thread runs (a dead doorbell turns /health unhealthy)."""
        return True


class Transport(QueueOperations, abc.ABC):
    """The queue's operations. Lost connections raise dramatiq.errors.ConnectionClosed.

    The operator's calls (cancel, list, retry, pause, prune, ...) come from QueueOperations, implemented once
    over `_call_function`.
    """

    @abc.abstractmethod
    def check_schema(self) -> None:
        """Raise QueueSchemaMissing when the queue functions are not installed."""

    @abc.abstractmethod
    def enqueue(self, jobs: Sequence[NewJob]) -> int:
        """Insert messages without an idempotency key (those go through enqueue_unique); an id seen before is
        ignored. Returns how many were inserted."""

    @abc.abstractmethod
    def enqueue_unique(self, job: NewJob) -> str:
        """Insert one message that carries an idempotency key; returns the id of the job that holds it.

        That is the new row, the row of the same message id sent before, or the pending or running job that
        already holds the key.
        """

    @abc.abstractmethod
    def claim(
        self, worker_id: str, queue_name: str, limit: int, lease_ms: int, claim_token: str
    ) -> list[ClaimedJob]:
        """Claim up to `limit` due jobs of one queue, highest priority first, then oldest.

        A call repeated with the same `claim_token` (its reply was lost) answers what the first one claimed.
        Only a registered worker claims anything.
        """

    @abc.abstractmethod
    def complete_many(self, claims: Sequence[Claim]) -> set[str]:
        """Mark held jobs completed in one call; returns the ids completed by these claims."""

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
    def cancel_held(self, claims: Sequence[Claim]) -> set[str]:
        """End held jobs whose cancellation was asked for as cancelled; returns the ids cancelled by these
        claims (idempotent per claim, like complete_many)."""

    @abc.abstractmethod
    def postpone(self, claim: Claim, delay_ms: int, note: str, options: dict[str, Any] | None) -> bool:
        """Put a held job back to pending after `delay_ms`, counting nothing; False if the claim was lost."""

    @abc.abstractmethod
    def presence_policy(self) -> PresencePolicy:
        """How this transport's workers show they are alive."""

    @abc.abstractmethod
    def register_worker(self, worker: WorkerInfo, policy: PresencePolicy) -> None:
        """Add a heartbeat-presence worker to the registry (lock presence registers through its doorbell)."""

    @abc.abstractmethod
    def heartbeat(
        self,
        worker_id: str,
        claims: Sequence[Claim],
        *,
        lease_ms: int | None,
        queues: Sequence[str],
        max_rescues: int,
    ) -> HeartbeatReply:
        """Note the worker alive, extend its leases (when `lease_ms` is given) and run the rescue."""

    @abc.abstractmethod
    def deregister_worker(self, worker_id: str) -> None:
        """Take a worker that stopped cleanly out of the registry."""

    @abc.abstractmethod
    def rescue(self, max_rescues: int) -> int:
        """Return dead workers' jobs and expired leases to pending (counting a rescue); how many moved."""

    @abc.abstractmethod
    def purge(self, queue_name: str) -> int:
        """Delete the pending jobs of a queue."""

    @abc.abstractmethod
    def stats(self) -> list[QueueStat]:
        """The queue's counts by queue and status."""

    @abc.abstractmethod
    def consumers(self) -> dict[str, int]:
        """Registered workers per queue they consume."""

    @abc.abstractmethod
    def ping(self, timeout_s: float) -> None:
        """Answer within `timeout_s` or raise ConnectionClosed: the readiness check."""

    @abc.abstractmethod
    def doorbell(
        self, worker: WorkerInfo | None = None, presence: PresenceListener | None = None
    ) -> Doorbell | None:
        """The wake-up source for this transport (LISTEN, Realtime, or a polling schedule), or None.

        With lock presence, the doorbell also registers `worker` and reports to `presence`.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""
