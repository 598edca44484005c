"""Settling held jobs: every path ends with the row settled, or with the job let go so its lease can lapse.

A lost connection (ConnectionClosed) reaches the caller, so Dramatiq repeats the ack or nack until the queue
answers; the job stays held meanwhile and its lease is kept. Any other failure (the error text refused, a 4xx
from the REST API, a rotated key) cannot be fixed by repeating the call: the job is dead-lettered instead with
a plain message, and if even that fails it is let go, never held and extended forever by a worker that will
not settle it. A job let go comes back through its worker's heartbeat (claimed but not held) or its lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dramatiq.logging import get_logger

from broker.acks import AckBatcher
from broker.errors import ConnectionClosed
from broker.holdings import Holdings
from broker.interrupts import LeaseLost
from broker.messages import JobProxy, storable_text
from broker.transport import Transport


class Settler:
    """The one place held jobs are completed, retried, postponed, dead-lettered or released."""

    def __init__(self, transport: Transport, holdings: Holdings, acks: AckBatcher) -> None:
        self.logger = get_logger(__name__, type(self))
        self.transport = transport
        self.holdings = holdings
        self.acks = acks

    def complete(self, proxy: JobProxy) -> None:
        """Queue the job's completion; it stays held (and its lease extended) until the batch commits."""
        self.acks.complete(proxy)

    def retry(self, proxy: JobProxy, delay_ms: int, error: str, options: dict[str, Any]) -> None:
        """Put the job back to pending after `delay_ms`, counting a retry. Raises ConnectionClosed."""
        try:
            if not self.transport.retry(proxy.claim, delay_ms, error, options):
                self.logger.warning("Job %s could not be retried: its claim was lost.", proxy.claim.job_id)
        except ConnectionClosed:
            raise
        except Exception as exc:
            self.logger.error(
                "Job %s could not be retried (%s); dead-lettering it.", proxy.claim.job_id, _why(exc)
            )
            self._dead_letter_plainly(proxy, error, exc)
            return
        self.let_go(proxy)

    def dead_letter(self, proxy: JobProxy, error: str) -> None:
        """Mark the job failed with its error. Raises ConnectionClosed."""
        try:
            if not self.transport.dead_letter(proxy.claim, error):
                self.logger.warning("Job %s failed after its claim was lost.", proxy.claim.job_id)
        except ConnectionClosed:
            raise
        except Exception as exc:
            self._dead_letter_plainly(proxy, error, exc)
            return
        self.let_go(proxy)

    def cancel(self, proxy: JobProxy) -> None:
        """End a job whose cancellation was asked for as cancelled. Raises ConnectionClosed."""
        try:
            if proxy.claim.job_id not in self.transport.cancel_held([proxy.claim]):
                self.logger.warning(
                    "Job %s stopped for its cancellation after its claim was lost.", proxy.claim.job_id
                )
        except ConnectionClosed:
            raise
        except Exception as exc:
            # Its row says its cancellation was asked for: whoever settles it next (the rescue) cancels it.
            self.logger.error(
                "Job %s could not be marked cancelled (%s); letting it go, the rescue will.",
                proxy.claim.job_id,
                _why(exc),
            )
        self.let_go(proxy)

    def postpone(self, proxy: JobProxy, delay_ms: int, note: str, options: dict[str, Any] | None) -> None:
        """Put the job back to pending after `delay_ms`, counting nothing. Raises ConnectionClosed."""
        try:
            self.transport.postpone(proxy.claim, delay_ms, storable_text(note), options)
        except ConnectionClosed:
            raise
        except Exception as exc:
            self.logger.error(
                "Job %s could not be postponed (%s); letting it go.", proxy.claim.job_id, _why(exc)
            )
        self.let_go(proxy)

    def release(self, proxies: Sequence[JobProxy]) -> int:
        """Return held jobs to pending at once, counting nothing. Raises ConnectionClosed (jobs stay held)."""
        pending = [p for p in proxies if not p.settled]
        if not pending:
            return 0
        try:
            released = self.transport.release([p.claim for p in pending])
        except ConnectionClosed:
            raise
        except Exception as exc:
            self.logger.error("Could not release %d job(s) (%s); letting them go.", len(pending), _why(exc))
            released = 0
        for proxy in pending:
            self.let_go(proxy)
        return released

    def lose(self, proxy: JobProxy, why: str) -> None:
        """The job is no longer surely ours: stop its run (if it runs) and never settle it."""
        if proxy.settled:
            return
        running = self.holdings.interrupt(proxy, LeaseLost)
        self.logger.warning(
            "Job %s %s: %s.", proxy.claim.job_id, "stopped" if running else "dropped before it ran", why
        )
        self.let_go(proxy)

    def let_go(self, proxy: JobProxy) -> None:
        """Settled, or given up: its ack changes nothing, its lease is no longer extended."""
        proxy.settled = True
        proxy.pending_retry = None
        self.holdings.forget(proxy)

    def _dead_letter_plainly(self, proxy: JobProxy, error: str, cause: Exception) -> None:
        first_line = storable_text(error.partition("\n")[0], limit=500)
        plain = f"{first_line}\n\n(the full error could not be stored: {_why(cause)})"
        try:
            if not self.transport.dead_letter(proxy.claim, plain):
                self.logger.warning("Job %s failed after its claim was lost.", proxy.claim.job_id)
        except ConnectionClosed:
            raise
        except Exception as exc:
            self.logger.error(
                "Job %s could not be dead-lettered either (%s); letting it go, its lease will return it.",
                proxy.claim.job_id,
                _why(exc),
            )
        self.let_go(proxy)


def _why(exc: BaseException) -> str:
    return storable_text(f"{type(exc).__name__}: {exc}", limit=300)
