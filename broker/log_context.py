"""The job's ids on every log line written while it runs: a middleware fills a context variable."""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy

#: The ids of the job this thread is running; None between jobs. Each worker thread has its own value.
_job_context: ContextVar[dict[str, str | None] | None] = ContextVar("job_log_context", default=None)


def current_job_context() -> dict[str, str | None]:
    """The ids of the job running in this thread (job_id, session_id, ...), or an empty dict between jobs."""
    context = _job_context.get()
    return dict(context) if context else {}


class JobLogContext(dramatiq.Middleware):
    """Puts job_id, session_id, message_id, worker_id and correlation_id on every line a job logs.

    The logging patcher in `service.logs` reads the context, so Dramatiq's own stdlib lines about the job
    carry the ids too. Add it first (`before=` the first middleware) so that its after-hooks run last and
    the other middlewares' lines about the job, such as Retries', still carry the ids.
    """

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        options = message.options
        # A fresh id is kept in the options, so the retries of this job log the same one.
        correlation_id = options.setdefault("correlation_id", uuid.uuid4().hex)
        session_id = options.get("session_id")
        _job_context.set(
            {
                # Our broker uses the row id as the message id, and keeps the producer's own message id
                # in an option when that was not a UUID it could use as the row id.
                "job_id": str(message.message_id),
                "session_id": None if session_id is None else str(session_id),
                "message_id": str(options.get("dramatiq_message_id") or message.message_id),
                "worker_id": self.worker_id,
                "correlation_id": str(correlation_id),
            }
        )

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        _job_context.set(None)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        _job_context.set(None)


class ArgumentsNotLogged(logging.Filter):
    """Keeps a job's arguments out of Dramatiq's per-actor DEBUG line ("Received args=... kwargs=...").

    The arguments hold user content (the prompt); ids are enough to follow a job. Jobs are named by their
    text elsewhere (JobProxy's str names the actor and the job only).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Received args="):
            record.msg = "Received a job (its arguments are not logged)."
            record.args = ()
        return True


def keep_arguments_out_of_logs(actor: dramatiq.Actor[..., object]) -> None:
    """Install ArgumentsNotLogged on an actor's own logger (once)."""
    if not any(isinstance(f, ArgumentsNotLogged) for f in actor.logger.filters):
        actor.logger.addFilter(ArgumentsNotLogged())
