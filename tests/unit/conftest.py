"""Fixtures for unit tests that build settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.settings import Settings


@pytest.fixture
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting from the developer's shell or .env reaches the test."""
    settings_names = set(Settings.model_fields)
    for name in list(os.environ):
        if name.lower() in settings_names:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
