#!/usr/bin/env python3
"""Developer commands that need nothing but Python 3.11+ (Linux and macOS).

    python3 scripts/dev.py run           set up .venv, enqueue demo jobs, run the worker (embedded database)
    python3 scripts/dev.py test [ARGS]   set up .venv, run pytest with ARGS (from the repository root)
    python3 scripts/dev.py lock          regenerate the requirements*.lock files with uv

Setup creates `.venv` when missing and installs `requirements-dev.lock` (hash-checked) and this project;
it is skipped when neither the lock file nor pyproject.toml changed since the last setup.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

MIN_PYTHON = (3, 11)
ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
DEV_LOCK = ROOT / "requirements-dev.lock"
STAMP = VENV / ".dev-setup.sha256"
#: Worker threads for `run` when MAX_CONCURRENT_JOBS is unset: enough to see two jobs run side by side.
DEFAULT_DEMO_THREADS = "2"


def say(message: str) -> None:
    print(f"[dev] {message}", file=sys.stderr, flush=True)


def run(*command: str | Path) -> None:
    say(" ".join(str(part) for part in command))
    subprocess.run([str(part) for part in command], cwd=ROOT, check=True)


def setup_fingerprint() -> str:
    digest = hashlib.sha256()
    for path in (DEV_LOCK, ROOT / "pyproject.toml"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_venv() -> None:
    if not (BIN / "python").exists():
        say(f"creating {VENV.relative_to(ROOT)}")
        venv.create(VENV, with_pip=True)


def setup() -> None:
    """Create .venv and install the locked dev dependencies and the project, unless already done."""
    ensure_venv()
    fingerprint = setup_fingerprint()
    if STAMP.exists() and STAMP.read_text().strip() == fingerprint:
        return
    run(BIN / "python", "-m", "pip", "install", "--require-hashes", "-r", DEV_LOCK)
    run(BIN / "python", "-m", "pip", "install", "--no-deps", "-e", ".")
    STAMP.write_text(fingerprint + "\n")


def exec_in_root(program: Path, *args: str, env: dict[str, str] | None = None) -> None:
    """Replace this process with `program`, so its exit code and signals are the caller's."""
    os.chdir(ROOT)
    command = [str(program), *args]
    say(" ".join(command))
    os.execve(program, command, env if env is not None else dict(os.environ))


def command_run() -> None:
    setup()
    env = dict(os.environ)
    env.setdefault("APP_ENV", "development")
    env.setdefault("MAX_CONCURRENT_JOBS", DEFAULT_DEMO_THREADS)
    say("enqueuing demo jobs")
    subprocess.run([str(BIN / "python"), "-m", "tasks.demo"], cwd=ROOT, env=env, check=True)
    exec_in_root(
        BIN / "dramatiq", "tasks", "--processes", "1", "--threads", env["MAX_CONCURRENT_JOBS"], env=env
    )


def command_test(pytest_args: list[str]) -> None:
    setup()
    exec_in_root(BIN / "pytest", *pytest_args)


def command_lock() -> None:
    ensure_venv()
    uv = BIN / "uv"
    if not uv.exists():
        run(BIN / "python", "-m", "pip", "install", "uv")
    options = ["--universal", "--python-version", "3.11", "--generate-hashes"]
    options += ["--custom-compile-command", "python3 scripts/dev.py lock", "--quiet"]
    run(uv, "pip", "compile", "pyproject.toml", *options, "--output-file", "requirements.lock")
    run(
        uv,
        "pip",
        "compile",
        "pyproject.toml",
        *options,
        "--extra",
        "dev",
        "--output-file",
        "requirements-dev.lock",
    )
    # The Dockerfile builds our wheel with this backend, installed from hashes like everything else.
    build_requirements = ROOT / "build-requirements.in"
    run(uv, "pip", "compile", build_requirements, *options, "--output-file", "requirements-build.lock")


def main(argv: list[str]) -> int:
    if sys.version_info < MIN_PYTHON:
        say(f"Python {'.'.join(map(str, MIN_PYTHON))}+ is required; this is {sys.version.split()[0]}")
        return 2
    if not argv or argv[0] not in {"run", "test", "lock"}:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "run":
            command_run()
        elif command == "test":
            command_test(rest)
        else:
            command_lock()
    except subprocess.CalledProcessError as exc:
        say(f"failed (exit {exc.returncode}): {' '.join(map(str, exc.cmd))}")
        return exc.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
