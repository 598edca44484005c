"""The queue's defaults, defined once: the broker's constructor and the service's settings both use them.

Plain numbers in a module of their own, so that the settings (read by every entry point, the container's
health probe included) can use them without importing Dramatiq.
"""

from __future__ import annotations

#: Milliseconds a claimed job stays ours without an extension (JOB_LEASE_MS).
DEFAULT_LEASE_MS = 60_000
#: Milliseconds between claims of an idle queue when no doorbell rings (POLL_INTERVAL_MS).
DEFAULT_POLL_INTERVAL_MS = 10_000
#: Retries of a job whose actor sets none: the row default of coding_jobs.max_retries, and Dramatiq's Retries.
DEFAULT_MAX_RETRIES = 3
#: Times a job may lose its worker (killed, OOM-killed, frozen past its lease) before it is dead-lettered as a
#: poison pill (MAX_RESCUES).
DEFAULT_MAX_RESCUES = 5
#: Milliseconds a job naming an actor no worker knows is offered again before it fails, so a rolling deploy
#: can bring its code (UNKNOWN_ACTOR_GRACE_MS).
DEFAULT_UNKNOWN_ACTOR_GRACE_MS = 600_000
#: Days completed and cancelled jobs are kept before the retention deletes them (COMPLETED_RETENTION_DAYS).
DEFAULT_COMPLETED_RETENTION_DAYS = 7
#: Days failed jobs (the dead letters) are kept before the retention deletes them (FAILED_RETENTION_DAYS).
DEFAULT_FAILED_RETENTION_DAYS = 30
