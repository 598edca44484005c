"""The container's command: check the settings, then become the stock `dramatiq` CLI.

`python -m service.launch [extra dramatiq args]` execs `dramatiq tasks --processes WORKER_PROCESSES
--threads MAX_CONCURRENT_JOBS --worker-shutdown-timeout SHUTDOWN_TIMEOUT_MS`, so the settings (and a
`.env` file) decide the thread count and the shutdown deadline in one place, and a configuration mistake
stops the container before any process starts.
"""

from __future__ import annotations

import os
import shutil
import sys

from service.errors import ConfigurationError
from service.settings import Settings, load_settings

#: Exit code for a configuration mistake: restarting will not fix it.
EXIT_CONFIGURATION = 2


def dramatiq_argv(settings: Settings, extra: list[str]) -> list[str]:
    """The dramatiq command line the settings ask for."""
    return [
        "dramatiq",
        "tasks",
        "--processes",
        str(settings.worker_processes),
        "--threads",
        str(settings.max_concurrent_jobs),
        "--worker-shutdown-timeout",
        str(settings.shutdown_timeout_ms),
        *extra,
    ]


def main(argv: list[str]) -> None:
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        sys.stderr.write(exc.render() + "\n")
        raise SystemExit(EXIT_CONFIGURATION) from None
    command = dramatiq_argv(settings, argv)
    # The dramatiq script installed beside this interpreter, so a venv need not be on PATH.
    executable = shutil.which("dramatiq", path=os.path.dirname(sys.executable)) or shutil.which("dramatiq")
    if executable is None:
        sys.stderr.write("The dramatiq CLI is not installed in this environment.\n")
        raise SystemExit(EXIT_CONFIGURATION)
    sys.stdout.flush()
    os.execv(executable, command)


if __name__ == "__main__":
    main(sys.argv[1:])
