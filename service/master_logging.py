"""Makes the dramatiq CLI's main process log like its workers; imported by a .pth file at interpreter start.

The CLI's main process never imports our code, so without this its own lines ("Dramatiq is booting up",
"Sending signal ...", "Worker ... exited unexpectedly") would be plain text among the JSON. Every other
program in the environment only pays for importing this small module.
"""

from __future__ import annotations

import os
import sys

#: Names of the scripts that run dramatiq.cli.main.
_CLI_SCRIPTS = frozenset({"dramatiq", "dramatiq-gevent"})


def _is_dramatiq_cli() -> bool:
    argv = getattr(sys, "argv", None) or [""]
    return os.path.basename(argv[0]) in _CLI_SCRIPTS


def install() -> None:
    """Configure logging when this interpreter is the dramatiq CLI; do nothing in any other program."""
    if not _is_dramatiq_cli():
        return
    try:
        from service.errors import ConfigurationError
        from service.logs import configure_logging
        from service.settings import load_settings

        try:
            settings = load_settings()
        except ConfigurationError:
            # The worker processes report it, with every problem listed; the CLI keeps its own format.
            return
        configure_logging(settings)
    except Exception:
        # A failing .pth line would print a traceback on every start; the CLI's own logging still works.
        return


install()
