"""Sending many messages in one round trip: batches of rows, and the per-thread collector of batched sends.

One `enqueue_jobs` call inserts a whole batch in one statement and one commit, and the doorbell rings once per
queue and batch, not once per job. A batch larger than MAX_BATCH_JOBS goes in several calls, each its own
transaction: if one fails, the calls before it are committed, and sending the whole batch again is safe
(a message id seen before is ignored).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from dramatiq.message import Message

from broker.transport import NewJob

#: Messages per `enqueue_jobs` call: one JSON array of about 1 MB for typical messages.
MAX_BATCH_JOBS = 5_000

#: A message and its delay in milliseconds (None: none).
Queued = tuple[Message[Any], int | None]


def chunks(jobs: Sequence[NewJob], size: int = MAX_BATCH_JOBS) -> Iterator[Sequence[NewJob]]:
    """The jobs in slices of at most `size`, in order."""
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


class SendCollector:
    """Per thread: while a `batched_sends()` block runs, the broker's enqueues are kept here, not sent."""

    def __init__(self) -> None:
        self._local = threading.local()

    def open(self) -> None:
        """Start a block on this thread; blocks may nest (the outermost one sends)."""
        marks: list[int] = self._marks()
        if not marks:
            self._local.queued = []
        marks.append(len(self._local.queued))

    def close(self, *, discard: bool) -> list[Queued] | None:
        """End a block, dropping what it queued when `discard`; the outermost returns what is left to send."""
        marks = self._marks()
        mark = marks.pop()
        queued: list[Queued] = self._local.queued
        if discard:
            del queued[mark:]
        if marks:
            return None
        self._local.queued = []
        return queued

    def collecting(self) -> bool:
        return bool(self._marks())

    def add(self, message: Message[Any], delay: int | None) -> None:
        self._local.queued.append((message, delay))

    def _marks(self) -> list[int]:
        marks: list[int] | None = getattr(self._local, "marks", None)
        if marks is None:
            marks = self._local.marks = []
        return marks
