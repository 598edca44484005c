"""The worker process's exit codes, defined once; they match the dramatiq CLI's own.

Exit codes belong to the processes we start (the worker process, the launcher, `python -m service.migrate`);
producers that import `tasks` get exceptions instead.
"""

from __future__ import annotations

#: A configuration mistake (settings, credentials, missing migrations, a taken port): restarting will not fix
#: it. The same number as dramatiq.cli.RET_IMPORT, which the CLI uses for a module that cannot be imported.
EXIT_CONFIGURATION = 2
#: The queue cannot be reached at start-up: the restart policy tries again (dramatiq.cli.RET_CONNECT).
EXIT_UNREACHABLE = 3
#: `python -m service.migrate` could not apply the migrations: the database refused one.
EXIT_MIGRATION_FAILED = 1
#: The operator CLI: the queue refused what was asked (no such job, a filter it does not take).
EXIT_REFUSED = 1
