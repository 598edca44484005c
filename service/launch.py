"""The container's command: check the settings, then run the stock dramatiq CLI in this very process.

`python -m service.launch [modules...] [dramatiq flags...]` runs `dramatiq tasks [modules...] --processes
WORKER_PROCESSES --threads MAX_CONCURRENT_JOBS --worker-shutdown-timeout SHUTDOWN_TIMEOUT_MS [flags...]`,
so the settings (and a `.env` file) decide the process and thread counts and the shutdown deadline in one
place, and a configuration mistake stops the container before any process starts. Flags given here win over
the settings, and the worker says so at start-up.

The CLI runs in-process (dramatiq.cli.main), not by exec: its main process then logs through the service's
sink, so in production its own lines ("Sending signal ...", "Worker ... exited unexpectedly") are JSON like
every other. This process is still the CLI's main process, PID 1 in a container, and gets the signals.
"""

from __future__ import annotations

import os
import shutil
import sys

from service.errors import ConfigurationError
from service.exit_codes import EXIT_CONFIGURATION
from service.logs import configure_logging, report_configuration_error
from service.settings import Settings, load_settings


def dramatiq_argv(settings: Settings, extra: list[str]) -> list[str]:
    """The dramatiq command line the settings ask for; leading `extra` words are modules, the rest flags."""
    first_flag = next((index for index, word in enumerate(extra) if word.startswith("-")), len(extra))
    # Modules go right after the broker module: argparse takes no positional argument after the flags.
    modules, flags = extra[:first_flag], extra[first_flag:]
    return [
        "dramatiq",
        "tasks",
        *modules,
        "--processes",
        str(settings.worker_processes),
        "--threads",
        str(settings.max_concurrent_jobs),
        "--worker-shutdown-timeout",
        str(settings.shutdown_timeout_ms),
        *flags,
    ]


def main(argv: list[str]) -> int:
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        report_configuration_error(exc, logger_name=__name__)
        return EXIT_CONFIGURATION
    configure_logging(settings)
    command = dramatiq_argv(settings, argv)
    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    # The worker processes read the command line to compare it with the settings, and a SIGHUP makes the
    # CLI exec sys.argv again: both see the dramatiq command itself. (After such a reload the main process's
    # own lines are Dramatiq's plain text again; its workers still log through the service's sink.)
    script = shutil.which("dramatiq", path=os.path.dirname(sys.executable)) or shutil.which("dramatiq")
    sys.argv = [script or "dramatiq", *command[1:]]
    arguments = make_argument_parser().parse_args(command[1:])
    return int(dramatiq_main(arguments) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
