"""The house style is checked, not hoped for: ruff and mypy (strict) over the service's code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: The service's packages; tests and benchmarks are linted by ruff but not type-checked strictly.
PACKAGES = ("broker", "health", "jobs", "ops", "service", "tasks", "worker")


def run(*command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)


def test_ruff_finds_nothing() -> None:
    result = run(str(BIN / "ruff"), "check", ".", timeout_s=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_formatting_is_applied() -> None:
    result = run(str(BIN / "ruff"), "format", "--check", ".", timeout_s=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_mypy_strict_finds_nothing() -> None:
    result = run(str(BIN / "mypy"), *PACKAGES, timeout_s=280)
    assert result.returncode == 0, result.stdout + result.stderr
