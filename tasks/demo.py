"""Enqueue a few demo coding jobs, so a newcomer sees the worker do something: `python -m tasks.demo`."""

from __future__ import annotations

import uuid

from loguru import logger

from tasks import run_coding_job

#: (plan, priority) of the demo jobs: Free 0, Starter 5, Pro/Enterprise 10.
DEMO_JOBS = (("free", 0), ("starter", 5), ("pro", 10))


def main() -> None:
    session_id = str(uuid.uuid4())
    for plan, priority in DEMO_JOBS:
        run_coding_job.send_with_options(
            kwargs={"prompt": f"Demo job for a {plan} user", "session_id": session_id}, priority=priority
        )
    logger.info("Enqueued {} demo jobs for session {}; the pro job runs first.", len(DEMO_JOBS), session_id)


if __name__ == "__main__":
    main()
