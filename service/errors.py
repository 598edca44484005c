"""Errors of the service's wiring: settings and start-up."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class for the service's own errors."""


class ConfigurationError(ServiceError):
    """Raised when settings are missing or invalid; `problems` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"Invalid configuration ({len(self.problems)} problem(s)):"]
        lines.extend(f"  - {problem}" for problem in self.problems)
        return "\n".join(lines)


class BrokerConflict(ServiceError):
    """Raised when Dramatiq's global broker is already another one as `tasks` is imported: an actor was
    declared (or a message sent) before, and went to that broker instead of the queue."""

    def __init__(self, current: object) -> None:
        self.current = type(current).__name__
        super().__init__(
            f"Dramatiq's global broker is already a {self.current}: something declared an actor or sent a "
            "message before `tasks` was imported, and it went there instead of the queue. Import tasks "
            "before declaring actors: `from tasks import broker`, then `@dramatiq.actor(broker=broker)`."
        )
