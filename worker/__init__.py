"""The worker process's own middleware: start-up checks, heartbeat files, and the health server's fork.

`tasks` adds these to the broker; they run only in the processes the dramatiq CLI starts. The health server
itself lives in `health/` and shares nothing with them but the heartbeat files in RUN_DIR.
"""
