"""The producer side of the broker: one message per round trip, or many (enqueue_many, batched_sends)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import dramatiq
from dramatiq.message import Message
from dramatiq.middleware import Middleware
from dramatiq.middleware.retries import Retries

from broker.batches import Queued, SendCollector, chunks
from broker.defaults import DEFAULT_MAX_RETRIES
from broker.messages import IDEMPOTENCY_KEY_OPTION, new_job
from broker.transport import NewJob, Transport


class SendingBroker(dramatiq.Broker):
    """Turns Dramatiq's enqueues into rows: `send()` is one `enqueue_job` call, a batch one `enqueue_jobs`."""

    def __init__(self, transport: Transport, *, middleware: list[Middleware] | None = None) -> None:
        super().__init__(middleware=middleware)
        self.transport = transport
        self._collector = SendCollector()

    def held_retry(self, message: Message[Any], delay: int | None) -> Message[Any] | None:
        """A worker's hook: reschedule `message` if it is a job this process holds (Dramatiq's Retries
        re-enqueues the message it is processing) and return it; None for a new message."""
        return None

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        retried = self.held_retry(message, delay)
        if retried is not None:
            return retried
        if self._collector.collecting():
            self._collector.add(message, delay)
            return message
        self.emit_before("enqueue", message, delay)
        [message] = self._insert([(message, self._new_job(message, delay))])
        self.emit_after("enqueue", message, delay)
        return message

    def enqueue_many(
        self, messages: Iterable[Message[Any]], *, delay: int | None = None
    ) -> list[Message[Any]]:
        """Send many messages in one round trip: one statement, one commit, one doorbell ring per queue.

        Raises ConnectionClosed when the queue is unreachable; sending the same messages again is then safe
        (a message id seen before is ignored). See broker/batches.py for batches above MAX_BATCH_JOBS.
        """
        return self._send_all([(message, delay) for message in messages])

    @contextlib.contextmanager
    def batched_sends(self) -> Iterator[None]:
        """Messages this thread sends inside the block (`send`, `group.run`, `pipeline.run`) are sent together
        at its end, in one round trip; if the block raises, none of them is sent."""
        self._collector.open()
        try:
            yield
        except BaseException:
            self._collector.close(discard=True)
            raise
        queued = self._collector.close(discard=False)
        if queued:
            self._send_all(queued)

    def _send_all(self, queued: list[Queued]) -> list[Message[Any]]:
        fresh = [(message, delay) for message, delay in queued if self.held_retry(message, delay) is None]
        for message, delay in fresh:
            self.emit_before("enqueue", message, delay)
        sent = self._insert([(message, self._new_job(message, delay)) for message, delay in fresh])
        for message, (_, delay) in zip(sent, fresh, strict=True):
            self.emit_after("enqueue", message, delay)
        holders = {id(original): message for (original, _), message in zip(fresh, sent, strict=True)}
        return [holders.get(id(message), message) for message, _ in queued]

    def _insert(self, sends: list[tuple[Message[Any], NewJob]]) -> list[Message[Any]]:
        """Insert the jobs, plain ones in batches; each message sent, or the message of the job that already
        holds its idempotency key (a keyed job is one call of its own, which answers with that job)."""
        for batch in chunks([job for _, job in sends if job.options.get(IDEMPOTENCY_KEY_OPTION) is None]):
            self.transport.enqueue(batch)
        sent = []
        for message, job in sends:
            if job.options.get(IDEMPOTENCY_KEY_OPTION) is not None:
                holder = self.transport.enqueue_unique(job)
                if holder != job.id:  # the key's job already exists: the caller gets that one
                    message = message.copy(message_id=holder)
            sent.append(message)
        return sent

    def _new_job(self, message: Message[Any], delay: int | None) -> NewJob:
        return new_job(message, default_max_retries=self._max_retries(message), delay_ms=delay or 0)

    def _max_retries(self, message: Message[Any]) -> int:
        actor = self.actors.get(message.actor_name)
        if actor is not None and "max_retries" in actor.options:
            return int(actor.options["max_retries"])
        for middleware in self.middleware:
            if isinstance(middleware, Retries):
                return int(middleware.max_retries)
        return DEFAULT_MAX_RETRIES
