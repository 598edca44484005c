"""Mapping between Dramatiq messages and queue rows."""

from __future__ import annotations

import traceback
import uuid
from typing import Any

from dramatiq.broker import MessageProxy
from dramatiq.message import Message

from broker.transport import Claim, ClaimedJob, NewJob

#: Message options that live in their own columns or are rebuilt from the row on every claim.
ROW_OPTIONS = frozenset({"retries", "max_retries", "priority", "traceback", "eta", "session_id"})
#: Characters of error text kept in the row.
MAX_ERROR_CHARS = 8000


class UndecodableJob(ValueError):
    """Raised when a row's message fields are not a valid Dramatiq message."""


class JobProxy(MessageProxy):
    """A claimed row as Dramatiq sees it, carrying the claim that fences its ack."""

    def __init__(self, message: Message[Any], claim: Claim) -> None:
        super().__init__(message)
        self.claim = claim
        #: Set once the job left our hands (retried, released or dead-lettered) so the ack is skipped.
        self.settled = False
        #: Set when the worker starts acking it, so a lease check racing the ack does not call it lost.
        self.finishing = False
        #: (delay_ms, error, options) of a retry that could not reach the queue yet; the ack sends it.
        self.pending_retry: tuple[int, str, dict[str, Any]] | None = None


def job_id_for(message: Message[Any]) -> str:
    """The row id of a message: its message id when that is a UUID, else a UUID derived from it."""
    try:
        return str(uuid.UUID(message.message_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dramatiq:{message.message_id}"))


def new_job(message: Message[Any], *, default_max_retries: int, delay_ms: int = 0) -> NewJob:
    """The row for a message a producer sends."""
    options = {k: v for k, v in message.options.items() if k not in ROW_OPTIONS}
    if str(message.message_id) != job_id_for(message):
        options["dramatiq_message_id"] = message.message_id
    return NewJob(
        id=job_id_for(message),
        queue_name=message.queue_name,
        actor_name=message.actor_name,
        args=list(message.args),
        kwargs=dict(message.kwargs),
        options=options,
        priority=int(message.options.get("priority", 0)),
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
        kwargs=job.kwargs,
        options=options,
        message_id=job.id,
        message_timestamp=int(job.created_at.timestamp() * 1000),
    )
    return JobProxy(message, Claim(job.id, job.claim_token))


def stored_options(message: MessageProxy) -> dict[str, Any]:
    """The options worth keeping in the row when a job is retried."""
    return {k: v for k, v in message.options.items() if k not in ROW_OPTIONS and k != "requeue_timestamp"}


def error_text(message: MessageProxy) -> str:
    """The error and its traceback for the row, from what Dramatiq stuffed into the message."""
    exc = getattr(message, "_exception", None)
    summary = f"{type(exc).__name__}: {exc}" if exc is not None else "failed"
    trace = message.options.get("traceback")
    if trace is None and exc is not None and exc.__traceback__ is not None:
        trace = "".join(traceback.format_exception(exc))
    text = f"{summary}\n\n{trace.rstrip()}" if trace else summary
    return text[:MAX_ERROR_CHARS]


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )
