"""A SIGTERM that reaches the health server's gunicorn worker from outside stops the whole worker service.

Orchestrators signal a container's PID 1 (the dramatiq main process), which then stops its children in order.
Tools and people sometimes signal another process of the tree instead, often the newest one, and that is
gunicorn's worker, a grandchild: on its own it would just exit and be replaced by its arbiter, leaving the
service running. So that worker waits for SIGTERM with sigwaitinfo, which names the sender: from its arbiter
it is the normal stop; from anyone else it is handed to the dramatiq main process as a request to stop
everything gracefully (the main process then stops the workers, then this server, as usual).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from loguru import logger


def forward_foreign_sigterm(worker: Any, dramatiq_pid: int) -> None:
    """Install, in a new gunicorn worker (post_fork), the sender check described above (Linux)."""
    if not hasattr(signal, "sigwaitinfo"):
        return  # macOS has no sigwaitinfo: gunicorn's own handling stays
    arbiter_pid = os.getppid()
    # Blocked before the worker starts any thread: they all inherit the mask, so SIGTERM is only ever taken
    # by the waiting thread below.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_sigterm() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == arbiter_pid or not _alive(dramatiq_pid):
                worker.alive = False  # what gunicorn's own SIGTERM handler does: a graceful exit
                return
            logger.bind(sender_pid=info.si_pid, dramatiq_pid=dramatiq_pid).warning(
                "Health server got SIGTERM from outside its process tree: stopping the whole worker service"
            )
            os.kill(dramatiq_pid, signal.SIGTERM)

    threading.Thread(target=wait_for_sigterm, name="health-sigterm", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
