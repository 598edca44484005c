"""The coding job: what runs for each row the web app's Edge Function inserts.

For now it is simulated: it logs its steps and sleeps. Sandboxes and model calls slot into `CodingJob.run`.
"""

from __future__ import annotations

import time

import dramatiq
from loguru import logger

from service.settings import Settings

#: The actor the coding_jobs table's defaults point at.
CODING_ACTOR_NAME = "run_coding_job"
#: The queue the coding_jobs table's defaults point at.
CODING_QUEUE_NAME = "default"
#: The simulated steps, each taking an equal share of the configured duration.
STEPS = ("preparing workspace", "generating changes", "applying changes")


class CodingJob:
    """One coding job's steps; built once from the settings and shared by the actor's calls."""

    def __init__(self, settings: Settings) -> None:
        self.duration_s = settings.coding_job_duration_ms / 1000

    def run(
        self, prompt: str | None, session_id: str | None, project_id: str | None, user_id: str | None
    ) -> None:
        log = logger.bind(project_id=project_id, user_id=user_id)
        log.info("Coding job started ({} characters of prompt)", len(prompt or ""))
        for step in STEPS:
            log.info("Coding job step: {}", step)
            time.sleep(self.duration_s / len(STEPS))
        log.success("Coding job finished")


def declare_coding_actor(broker: dramatiq.Broker, job: CodingJob) -> dramatiq.Actor[..., None]:
    """Declare the default coding-job actor on the broker."""

    def run_coding_job(
        prompt: str | None = None,
        session_id: str | None = None,
        project_id: str | None = None,
        user_id: str | None = None,
    ) -> None:
        job.run(prompt, session_id, project_id, user_id)

    declare = dramatiq.actor(actor_name=CODING_ACTOR_NAME, queue_name=CODING_QUEUE_NAME, broker=broker)
    return declare(run_coding_job)
