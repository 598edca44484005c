"""Stopping a running job from outside its thread, the way Dramatiq's TimeLimit does.

The broker raises one of these in the worker thread that runs a job (an asynchronous exception: it lands the
next time that thread runs Python code, so a job blocked in a long system call stops when the call returns).
They derive from Dramatiq's Interrupt, a BaseException, so an actor's `except Exception` does not swallow
them; an actor may catch one to clean up, or look at `should_stop()` between steps to stop cleanly first.
"""

from __future__ import annotations

import threading

from dramatiq.middleware.threading import Interrupt

_current = threading.local()


class JobInterrupted(Interrupt):
    """Base class of the exceptions the broker raises in a worker thread to stop the job it runs."""

    #: Why, in a few words, for the log line.
    reason = "interrupted"


class LeaseLost(JobInterrupted):
    """Raised in a job whose claim this worker no longer holds: another worker may be running it."""

    reason = "this worker no longer holds its claim"


class ShutdownDeadline(JobInterrupted):
    """Raised in a job still running at the worker's shutdown deadline; the job goes back to the queue."""

    reason = "the worker's shutdown deadline passed"


class JobCancelled(JobInterrupted):
    """Raised in a job whose cancellation was asked for (cancel_jobs, cancel_my_job, broker.cancel); the job
    ends `cancelled` and is not retried.

    `should_stop()` turns True as soon as the request arrives, and the exception follows CANCEL_GRACE_S later
    if the job is still running: an actor that checks should_stop() between steps can stop cleanly first.
    """

    reason = "its cancellation was asked for"


def should_stop() -> bool:
    """True when the job running in this thread has been asked to stop: it was cancelled, its claim was lost,
    the worker's shutdown deadline passed, ...

    Cheap enough to call between any two steps of an actor; an actor that sees True should return (or raise)
    without doing more work: the broker settles the job as the reason says (a cancelled job ends
    `cancelled` however the actor returns), and a job whose claim was lost is settled by whoever holds it now.
    """
    check = getattr(_current, "check", None)
    return bool(check is not None and check())


def set_stop_check(check: object | None) -> None:
    """Install (or clear, with None) the current thread's should_stop() check; the broker calls this."""
    _current.check = check
