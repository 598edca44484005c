"""A call on a daemon thread that callers wait for with a deadline of their own.

The health server must answer probes on time even when the database hangs: a driver may wait out its pool
or connect timeout (seconds) before it fails. Callers stop waiting at their deadline; the call finishes on
its own, and a daemon thread never holds up the process's exit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BackgroundCall(Generic[T]):
    """Runs `function` once, at once, on a daemon thread."""

    def __init__(self, function: Callable[[], T], name: str) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None
        self._function = function
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self.result = self._function()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def wait(self, timeout_s: float) -> bool:
        """True when the call has finished (either way) within `timeout_s`."""
        return self.done.wait(timeout_s)
