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
