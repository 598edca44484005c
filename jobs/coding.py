"""The coding job: what runs for each row the web app's Edge Function inserts.

For now it is simulated: it logs its steps and sleeps. Sandboxes and model calls slot into `CodingJob.run`.
"""

from __future__ import annotations

import time

import dramatiq
from loguru import logger

from broker.interrupts import should_stop
from service.settings import Settings

#: The actor the coding_jobs table's defaults point at.
CODING_ACTOR_NAME = "run_coding_job"
#: The queue the coding_jobs table's defaults point at.
CODING_QUEUE_NAME = "default"
#: The simulated steps, each taking an equal share of the configured duration.
STEPS = ("preparing workspace", "generating changes", "applying changes")
#: Seconds of one slice of a simulated step: the job notices a request to stop within this long.
SLICE_S = 0.05


class InvalidJobInput(ValueError):
    """Raised when a job's input cannot be run; the job fails at once, with no retry, naming the field."""


class CodingJob:
    """One coding job's steps; built once from the settings and shared by the actor's calls."""

    def __init__(self, settings: Settings) -> None:
        self.duration_s = settings.coding_job_duration_ms / 1000

    def run(
        self, prompt: str | None, session_id: str | None, project_id: str | None, user_id: str | None
    ) -> None:
        validate_input(prompt)
        log = logger.bind(project_id=project_id, user_id=user_id)
        log.info("Coding job started ({} characters of prompt)", len(prompt or ""))
        for step in STEPS:
            log.info("Coding job step: {}", step)
            if not _work(self.duration_s / len(STEPS)):
                log.warning("Coding job stopped before it finished: this worker was asked to stop it")
                return
        log.success("Coding job finished")


def validate_input(prompt: object) -> None:
    """Raise InvalidJobInput when the prompt is missing, empty or not text."""
    if prompt is None:
        raise InvalidJobInput("prompt: missing (the row's prompt column is null)")
    if not isinstance(prompt, str):
        raise InvalidJobInput(f"prompt: must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InvalidJobInput("prompt: empty")


def _work(duration_s: float) -> bool:
    """Simulated work in short slices, stopping early when asked; True when it ran to the end."""
    deadline = time.monotonic() + duration_s
    while (remaining := deadline - time.monotonic()) > 0:
        if should_stop():
            return False
        time.sleep(min(SLICE_S, remaining))
    return not should_stop()


def declare_coding_actor(broker: dramatiq.Broker, job: CodingJob) -> dramatiq.Actor[..., None]:
    """Declare the default coding-job actor on the broker; bad input fails at once (no retry)."""

    def run_coding_job(
        prompt: str | None = None,
        session_id: str | None = None,
        project_id: str | None = None,
        user_id: str | None = None,
    ) -> None:
        job.run(prompt, session_id, project_id, user_id)

    declare = dramatiq.actor(
        actor_name=CODING_ACTOR_NAME, queue_name=CODING_QUEUE_NAME, broker=broker, throws=(InvalidJobInput,)
    )
    return declare(run_coding_job)
