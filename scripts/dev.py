#!/usr/bin/env python3
"""Developer commands that need nothing but Python 3.11+ (Linux and macOS).

    python3 scripts/dev.py run           set up .venv, migrate, enqueue demo jobs, run the worker until Ctrl-C
    python3 scripts/dev.py stop          stop the embedded PostgreSQL (EMBEDDED_DATABASE_DIR) if it runs
    python3 scripts/dev.py test [ARGS]   set up .venv, run pytest with ARGS (from the repository root)
    python3 scripts/dev.py lock          regenerate the requirements*.lock files with uv

Setup creates `.venv` when missing and installs `requirements-dev.lock` (hash-checked, with the `embedded`
extra: pgserver) and this project; it is skipped when neither the lock file nor pyproject.toml changed since.

`run` uses DATABASE_URL when it is set (environment or .env); without it, an embedded PostgreSQL in
`.data/postgres`, which `run` starts and, if it started it, stops again when the worker stops.
"""

from __future__ import annotations

import hashlib
import os
import signal
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


#: What `python -m service.embedded_db status` exits with when the embedded database is used but not running.
EMBEDDED_STOPPED = 1


def run(*command: str | Path, env: dict[str, str] | None = None) -> None:
    say(" ".join(str(part) for part in command))
    subprocess.run([str(part) for part in command], cwd=ROOT, check=True, env=env)


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


def command_run() -> int:
    setup()
    env = dict(os.environ)
    env.setdefault("APP_ENV", "development")
    env.setdefault("MAX_CONCURRENT_JOBS", DEFAULT_DEMO_THREADS)
    python = BIN / "python"
    status = subprocess.run(
        [str(python), "-m", "service.embedded_db", "status"], cwd=ROOT, env=env, check=False
    )
    try:
        # The embedded database (started here when it is not running) or DATABASE_URL's; --bootstrap adds
        # Supabase's roles to plain PostgreSQL and leaves a Supabase project alone.
        run(python, "-m", "service.migrate", "--bootstrap", env=env)
        say("enqueuing demo jobs")
        run(python, "-m", "tasks.demo", env=env)
        return run_worker([str(python), "-m", "service.launch"], env)
    finally:
        if status.returncode == EMBEDDED_STOPPED:
            # It was not running before `run`: leave it as it was found.
            run(python, "-m", "service.embedded_db", "stop", env=env)


def run_worker(command: list[str], env: dict[str, str]) -> int:
    """Run the worker until it exits; Ctrl-C reaches it from the terminal, and it stops gracefully."""
    say(" ".join(command))
    worker = subprocess.Popen(command, cwd=ROOT, env=env)
    # SIGTERM to this script is passed on; Ctrl-C is not: the terminal sends SIGINT to the worker already, and
    # a second one would make it kill its jobs.
    signal.signal(signal.SIGTERM, lambda signum, frame: worker.send_signal(signal.SIGTERM))
    while True:
        try:
            return worker.wait()
        except KeyboardInterrupt:
            say("stopping: the worker finishes its jobs first")


def command_stop() -> None:
    setup()
    run(BIN / "python", "-m", "service.embedded_db", "stop")


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
    if not argv or argv[0] not in {"run", "stop", "test", "lock"}:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "run":
            return command_run()
        if command == "stop":
            command_stop()
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
