"""Mapping between Dramatiq messages and queue rows."""

from __future__ import annotations

import math
import traceback
import uuid
from typing import Any

from dramatiq.broker import MessageProxy
from dramatiq.message import Message

from broker.transport import Claim, ClaimedJob, NewJob

#: Message options that live in their own columns or are rebuilt from the row on every claim.
ROW_OPTIONS = frozenset({"retries", "max_retries", "priority", "traceback", "eta", "session_id"})
#: Options that only exist in a worker's memory: never stored with a retry.
MEMORY_OPTIONS = frozenset({"requeue_timestamp", "throws", "retry_when"})
#: Characters of error text kept in the row.
MAX_ERROR_CHARS = 8000
#: The plan tiers a priority may name: Free 0, Starter 5, Pro/Enterprise 10 (the table's CHECK).
MIN_PRIORITY, MAX_PRIORITY = 0, 10
#: The kwarg whose value lives in the row's `prompt` column, never in its kwargs.
PROMPT_KWARG = "prompt"
#: The message option naming a job's idempotency key: while a job with that key is pending or running, sending
#: another gives back that job (the row's `idempotency_key` column).
IDEMPOTENCY_KEY_OPTION = "idempotency_key"
#: Characters an idempotency key may have.
MAX_IDEMPOTENCY_KEY_CHARS = 500

# Options Dramatiq's middleware reads, and what each must be: a row with anything else fails with a message
# naming the option, instead of a middleware error that Dramatiq would log and swallow.
_POSITIVE_NUMBERS = frozenset({"time_limit", "max_age"})
_NON_NEGATIVE_NUMBERS = frozenset({"min_backoff", "max_backoff", "result_ttl"})
_STRINGS = frozenset(
    {"correlation_id", "on_success", "on_failure", "on_retry_exhausted", "dramatiq_message_id"}
)
_BOOLEANS = frozenset({"pipe_ignore", "store_results", "notify_shutdown"})
_OBJECTS = frozenset({"pipe_target"})
_NOT_STORABLE = frozenset({"throws", "retry_when"})


class UndecodableJob(ValueError):
    """Raised when a row's message fields are not a valid Dramatiq message."""


class JobProxy(MessageProxy):
    """A claimed row as Dramatiq sees it, carrying the claim that fences its ack.

    Its text names the actor and the job, never the arguments: Dramatiq logs messages by their text (every
    failure at ERROR, every job at DEBUG), and the arguments hold the user's prompt.
    """

    def __init__(self, message: Message[Any], claim: Claim) -> None:
        super().__init__(message)
        self.claim = claim
        #: Set once the job left our hands (completed, retried, released or dead-lettered, or lost).
        self.settled = False
        #: Set when the worker starts acking it, so a lease check racing the ack does not call it lost.
        self.finishing = False
        #: (delay_ms, error, options) of a retry that could not reach the queue yet; the ack sends it.
        self.pending_retry: tuple[int, str, dict[str, Any]] | None = None
        #: Why the job was taken from its thread (a JobInterrupted subclass), or None.
        self.interrupted: type[BaseException] | None = None
        #: True while it counts against the claim capacity: claimed and not finished running.
        self.occupying = True
        #: Monotonic seconds at which its run started (None before).
        self.started_at: float | None = None
        #: Monotonic seconds at which its claim was sent.
        self.claimed_at = 0.0
        #: Set when it is being handed back unstarted (claimed ahead, no thread freed up): it must not start.
        self.handing_back = False
        #: Set when its worker thread found it no longer ours as it was about to start (handed back, dropped,
        #: settled): it never ran here, so the ack Dramatiq gives a skipped message settles nothing.
        self.skipped = False
        #: Monotonic seconds until which its lease is known to hold (set by the claim and each extension).
        self.lease_valid_until = math.inf

    def __str__(self) -> str:
        return f"{self.actor_name}(job {self.claim.job_id})"

    def __repr__(self) -> str:
        return f"<JobProxy {self}>"


def job_id_for(message: Message[Any] | str) -> str:
    """The row id of a message (or message id): the id when that is a UUID, else a UUID derived from it."""
    message_id = message if isinstance(message, str) else message.message_id
    try:
        return str(uuid.UUID(message_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dramatiq:{message_id}"))


def new_job(message: Message[Any], *, default_max_retries: int, delay_ms: int = 0) -> NewJob:
    """The row for a message a producer sends; raises ValueError for a priority outside the plan tiers."""
    options = {k: v for k, v in message.options.items() if k not in ROW_OPTIONS}
    if str(message.message_id) != job_id_for(message):
        options["dramatiq_message_id"] = message.message_id
    priority = message.options.get("priority", 0)
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        raise ValueError(
            f"priority must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY} "
            f"(Free 0, Starter 5, Pro 10), got {priority!r}"
        )
    key = options.get(IDEMPOTENCY_KEY_OPTION)
    if key is not None and not (isinstance(key, str) and 0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS):
        raise ValueError(
            f"{IDEMPOTENCY_KEY_OPTION} must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY_CHARS} "
            f"characters, got {_shown(key)}"
        )
    return NewJob(
        id=job_id_for(message),
        queue_name=message.queue_name,
        actor_name=message.actor_name,
        args=list(message.args),
        kwargs=dict(message.kwargs),
        options=options,
        priority=priority,
        max_retries=int(message.options.get("max_retries", default_max_retries)),
        delay_ms=max(int(delay_ms), 0),
    )


def decode(job: ClaimedJob) -> JobProxy:
    """The Dramatiq message for a claimed row; raises UndecodableJob with a clear reason."""
    if not isinstance(job.args, list):
        raise UndecodableJob(f"args must be a JSON array, got {_json_type(job.args)}")
    if not isinstance(job.kwargs, dict):
        raise UndecodableJob(f"kwargs must be a JSON object, got {_json_type(job.kwargs)}")
    if not isinstance(job.options, dict):
        raise UndecodableJob(f"options must be a JSON object, got {_json_type(job.options)}")
    if not job.actor_name or not job.queue_name:
        raise UndecodableJob("actor_name and queue_name must not be empty")
    validate_options(job.options)
    kwargs = dict(job.kwargs)
    if job.prompt is not None and PROMPT_KWARG not in kwargs:
        kwargs[PROMPT_KWARG] = job.prompt  # the prompt is stored once, in its column
    options = {k: v for k, v in job.options.items() if k not in ROW_OPTIONS}
    options.update(
        retries=job.retry_count,
        max_retries=job.max_retries,
        priority=job.priority,
        session_id=job.session_id,
    )
    message: Message[Any] = Message(
        queue_name=job.queue_name,
        actor_name=job.actor_name,
        args=tuple(job.args),
        kwargs=kwargs,
        options=options,
        message_id=job.id,
        message_timestamp=int(job.created_at.timestamp() * 1000),
    )
    return JobProxy(message, Claim(job.id, job.claim_token))


def validate_options(options: dict[str, Any]) -> None:
    """Raise UndecodableJob naming the first option Dramatiq's middleware could not use."""
    for name, value in options.items():
        if value is None:
            continue
        if name in _POSITIVE_NUMBERS and not (_is_number(value) and value > 0):
            raise UndecodableJob(
                f"options.{name} must be a positive number of milliseconds, got {_shown(value)}"
            )
        if name in _NON_NEGATIVE_NUMBERS and not (_is_number(value) and value >= 0):
            raise UndecodableJob(f"options.{name} must be a number of milliseconds, got {_shown(value)}")
        if name in _STRINGS and not isinstance(value, str):
            raise UndecodableJob(f"options.{name} must be a string, got {_shown(value)}")
        if name in _BOOLEANS and not isinstance(value, bool):
            raise UndecodableJob(f"options.{name} must be true or false, got {_shown(value)}")
        if name in _OBJECTS and not isinstance(value, dict):
            raise UndecodableJob(f"options.{name} must be a JSON object, got {_shown(value)}")
        if name in _NOT_STORABLE:
            raise UndecodableJob(f"options.{name} cannot be stored in a row; set it on the actor")


def stored_options(message: MessageProxy) -> dict[str, Any]:
    """The options worth keeping in the row when a job is retried, made storable."""
    kept = {k: v for k, v in message.options.items() if k not in ROW_OPTIONS and k not in MEMORY_OPTIONS}
    return storable_json(kept)  # type: ignore[no-any-return]


def error_text(message: MessageProxy) -> str:
    """The error and its traceback for the row, from what Dramatiq stuffed into the message; storable."""
    exc = getattr(message, "_exception", None)
    summary = f"{type(exc).__name__}: {exc}" if exc is not None else "failed"
    trace = message.options.get("traceback")
    if trace is None and exc is not None and exc.__traceback__ is not None:
        trace = "".join(traceback.format_exception(exc))
    text = f"{summary}\n\n{trace.rstrip()}" if trace else summary
    return storable_text(text)


def storable_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Text PostgreSQL and JSON accept: NUL bytes and lone surrogates replaced, at most `limit` characters.

    Sandboxes and subprocesses produce such text easily, and a row that refuses the error text would leave
    its job unsettled.
    """
    text = text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def storable_json(value: Any) -> Any:
    """A JSON value with every string (keys too) made storable; other values unchanged."""
    if isinstance(value, str):
        return storable_text(value, limit=len(value) + 1)
    if isinstance(value, dict):
        return {storable_json(str(k)): storable_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable_json(v) for v in value]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: Any) -> str:
    return f"{_json_type(value)} {str(value)[:40]!r}"


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )
