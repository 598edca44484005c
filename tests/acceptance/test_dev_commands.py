"""The development commands as a newcomer runs them: `python3 scripts/dev.py run`, then Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from service.embedded_db import find_embedded_postgres, stop_embedded_postgres
from tests.support.processes import REPO_ROOT, CliProcess, free_port

pytestmark = pytest.mark.slow

#: Seconds for `run` to set up, start the embedded PostgreSQL (initdb included), and finish the demo jobs.
DEMO_S = 90.0
#: Seconds for `run` to stop after Ctrl-C, the embedded PostgreSQL included.
STOP_S = 30.0


def test_dev_run_stops_the_embedded_database_it_started_on_ctrl_c(tmp_path: Path) -> None:
    # Given no database configured: `run` starts an embedded PostgreSQL of its own (in a folder of this test)
    data_dir = tmp_path / "postgres"
    python3 = shutil.which("python3")
    assert python3, "the README's commands run with python3"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "DATABASE_URL": "",  # whatever a developer's .env says
        "EMBEDDED_DATABASE_DIR": str(data_dir),
        "RUN_DIR": str(tmp_path / "run"),
        "HEALTH_CHECK_PORT": str(free_port()),
        "CODING_JOB_DURATION_MS": "300",
    }
    process = CliProcess([python3, str(REPO_ROOT / "scripts" / "dev.py"), "run"], env, REPO_ROOT)
    try:
        # When the demo jobs have run and the developer presses Ctrl-C (SIGINT to the terminal's group)
        process.wait_for_lines(r"Coding job finished", 3, DEMO_S)
        assert find_embedded_postgres(data_dir) is not None
        process.signal_group(signal.SIGINT)
        code = process.wait(STOP_S)

        # Then the worker stopped cleanly and so did the embedded PostgreSQL that `run` started
        assert code == 0, process.tail()
        assert find_embedded_postgres(data_dir) is None, process.tail()
        process.wait_for_line(r"Stopped the embedded PostgreSQL", 1)
    finally:
        process.kill()
        stop_embedded_postgres(data_dir)
