"""What the dramatiq CLI was asked for: its command line, read in the processes it starts.

The stock CLI takes --processes, --threads and --worker-shutdown-timeout from its command line only, so a
worker started as `dramatiq tasks ...` may be asked for other numbers than WORKER_PROCESSES,
MAX_CONCURRENT_JOBS and SHUTDOWN_TIMEOUT_MS. The worker says so at start-up, and which one holds.
`python -m service.launch` passes the settings as these flags, so there they always agree.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from collections.abc import Sequence

from service.settings import Settings

#: The scripts that run dramatiq.cli.main, and the module `python -m dramatiq` runs.
_CLI_SCRIPTS = frozenset({"dramatiq", "dramatiq-gevent"})
_CLI_MODULE = os.path.join("dramatiq", "__main__.py")


def is_dramatiq_command(argv: Sequence[str]) -> bool:
    """True when `argv` is a dramatiq CLI command line (the launcher sets sys.argv to one too)."""
    program = argv[0] if argv else ""
    return os.path.basename(program) in _CLI_SCRIPTS or program.endswith(_CLI_MODULE)


def in_dramatiq_worker() -> bool:
    """True in a process the dramatiq CLI started (a worker or a fork), where exit codes are ours to give."""
    return multiprocessing.parent_process() is not None and is_dramatiq_command(sys.argv)


def cli_arguments(argv: Sequence[str]) -> argparse.Namespace | None:
    """The dramatiq CLI's arguments from its command line; None when `argv` is not one."""
    if not is_dramatiq_command(argv):
        return None
    from dramatiq.cli import make_argument_parser

    try:
        arguments, _ = make_argument_parser().parse_known_args(list(argv[1:]))
    except SystemExit:  # argparse's way of refusing; the CLI itself has parsed these already
        return None
    assert isinstance(arguments, argparse.Namespace)
    return arguments


def flag_differences(settings: Settings, arguments: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    """One phrase per CLI flag that differs from its setting, saying what holds."""
    processes, threads = arguments.processes, arguments.threads
    deadline_ms = arguments.worker_shutdown_timeout
    checks = (
        (
            "--processes",
            processes,
            "WORKER_PROCESSES",
            settings.worker_processes,
            f"{processes} worker process(es) run (the flag wins)",
        ),
        (
            "--threads",
            threads,
            "MAX_CONCURRENT_JOBS",
            settings.max_concurrent_jobs,
            f"at most {min(threads, settings.max_concurrent_jobs)} job(s) run at once per process"
            " (the smaller wins)",
        ),
        (
            "--worker-shutdown-timeout",
            deadline_ms,
            "SHUTDOWN_TIMEOUT_MS",
            settings.shutdown_timeout_ms,
            f"running jobs get {min(deadline_ms, settings.shutdown_timeout_ms)} ms after SIGTERM"
            " (the smaller wins)",
        ),
    )
    differences: list[str] = []
    for flag, asked, setting, configured, outcome in checks:
        if asked == configured:
            continue
        given = any(arg == flag or arg.startswith(f"{flag}=") for arg in argv)
        origin = "" if given else " (Dramatiq's default)"
        differences.append(f"{flag} {asked}{origin} vs {setting}={configured}: {outcome}")
    return differences
