"""Logging: JSON lines in production, pretty text in development, job ids on job lines, no secrets."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker
from loguru import logger

from broker.log_context import JobLogContext, current_job_context
from service.logs import configure_logging, redact
from service.settings import Settings, load_settings

DATABASE_PASSWORD = "hunter2-db-password"
DATABASE_URL = f"postgresql://worker:{DATABASE_PASSWORD}@127.0.0.1:1/queue"
JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


pytestmark = pytest.mark.usefixtures("isolated_environment")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo configure_logging: the root logger's handlers, loguru's sinks and the warnings hook."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    showwarning = warnings.showwarning
    try:
        yield
    finally:
        logging.captureWarnings(False)
        warnings.showwarning = showwarning
        root.handlers[:] = handlers
        root.setLevel(level)
        logger.remove()
        logger.configure(patcher=lambda record: None)
        # Like loguru's default sink, but following pytest's capture of stderr.
        logger.add(_write_to_stderr, level="DEBUG")


def _write_to_stderr(message: str) -> None:
    sys.stderr.write(message)


def production(**overrides: Any) -> Settings:
    return load_settings(app_env="production", database_url=DATABASE_URL, **overrides)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def proxy(message_id: str = "0b5a2c9e-4d0f-4c38-9f2e-5b1f0d9c7a11", **options: Any) -> MessageProxy:
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="coding",
        actor_name="run_coding_job",
        args=(),
        kwargs={},
        options=options,
        message_id=message_id,
    )
    return MessageProxy(message)


def test_production_lines_are_compact_json_objects() -> None:
    stream = io.StringIO()
    configure_logging(production(), stream=stream)

    logger.bind(attempt=2).info("claimed {} jobs", 3)

    [line] = json_lines(stream)
    assert set(line) == {"ts", "level", "logger", "message", "attempt"}
    assert line["level"] == "INFO"
    assert line["message"] == "claimed 3 jobs"
    assert line["logger"] == __name__
    assert line["attempt"] == 2
    assert line["ts"].endswith("Z")
    assert "T" in line["ts"]


def test_job_lines_carry_the_job_context_set_by_the_middleware() -> None:
    # Given: a running job, as the worker thread sees it between the middleware's hooks
    stream = io.StringIO()
    configure_logging(production(), stream=stream)
    broker = StubBroker()
    middleware = JobLogContext(worker_id="worker-7")
    message = proxy(session_id="session-1", correlation_id="corr-1")

    # When: loguru and Dramatiq's stdlib logger write during the job, and loguru after it
    middleware.before_process_message(broker, message)
    logger.info("inside the job")
    logging.getLogger("dramatiq.worker.WorkerThread").warning("stdlib inside the job")
    middleware.after_process_message(broker, message, result=None)
    logger.info("between jobs")

    # Then: both job lines carry every id, the line after the job none
    inside, stdlib_inside, after = json_lines(stream)
    expected = {
        "job_id": "0b5a2c9e-4d0f-4c38-9f2e-5b1f0d9c7a11",
        "session_id": "session-1",
        "message_id": "0b5a2c9e-4d0f-4c38-9f2e-5b1f0d9c7a11",
        "worker_id": "worker-7",
        "correlation_id": "corr-1",
    }
    assert {key: inside[key] for key in expected} == expected
    assert {key: stdlib_inside[key] for key in expected} == expected
    assert stdlib_inside["logger"] == "dramatiq.worker.WorkerThread"
    assert stdlib_inside["level"] == "WARNING"
    assert not set(expected) & set(after)
    assert current_job_context() == {}


def test_a_fresh_correlation_id_per_job_when_the_producer_set_none() -> None:
    broker = StubBroker()
    middleware = JobLogContext(worker_id="worker-1")
    seen: list[dict[str, str | None]] = []
    row_id = "7d4f3c2b-1a0e-4f9d-8c7b-6a5e4d3c2b1a"
    for message in (proxy(), proxy(message_id=row_id, dramatiq_message_id="producer-id")):
        middleware.before_process_message(broker, message)
        seen.append(current_job_context())
        middleware.after_skip_message(broker, message)
        assert current_job_context() == {}

    first, second = seen
    for context in seen:
        correlation_id = context["correlation_id"]
        assert correlation_id is not None
        assert len(correlation_id) == 32
        int(correlation_id, 16)
    assert first["correlation_id"] != second["correlation_id"]
    assert first["session_id"] is None
    assert second["job_id"] == row_id
    assert second["message_id"] == "producer-id"


def test_stdlib_logging_goes_through_the_same_sink_with_its_exception() -> None:
    stream = io.StringIO()
    configure_logging(production(), stream=stream)
    dramatiq_logger = logging.getLogger("dramatiq.broker")

    dramatiq_logger.info("plain %s", "args")
    dramatiq_logger.debug("below the level")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        dramatiq_logger.exception("job failed")

    plain, failed = json_lines(stream)
    assert plain == {"ts": plain["ts"], "level": "INFO", "logger": "dramatiq.broker", "message": "plain args"}
    assert failed["level"] == "ERROR"
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert failed["exception"].endswith("RuntimeError: boom")


def test_trace_level_writes_trace_lines_from_both_apis() -> None:
    stream = io.StringIO()
    configure_logging(production(log_level="trace"), stream=stream)

    logger.trace("fine detail")
    logging.getLogger("dramatiq.worker").debug("stdlib debug")

    assert [(line["level"], line["message"]) for line in json_lines(stream)] == [
        ("TRACE", "fine detail"),
        ("DEBUG", "stdlib debug"),
    ]


def test_fatal_level_keeps_only_critical_lines() -> None:
    stream = io.StringIO()
    configure_logging(production(log_level="fatal"), stream=stream)

    logger.error("an error")
    logging.getLogger("dramatiq").error("a stdlib error")
    logger.critical("the end")
    logging.getLogger("dramatiq").fatal("the stdlib end")

    assert [(line["level"], line["message"]) for line in json_lines(stream)] == [
        ("CRITICAL", "the end"),
        ("CRITICAL", "the stdlib end"),
    ]


def test_configure_logging_twice_keeps_one_sink() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(production(), stream=first)
    configure_logging(production(), stream=second)

    logger.info("once")
    logging.getLogger("dramatiq").info("once from stdlib")

    assert first.getvalue() == ""
    assert [line["message"] for line in json_lines(second)] == ["once", "once from stdlib"]


def test_credentials_are_redacted_from_messages_fields_and_tracebacks() -> None:
    stream = io.StringIO()
    settings = production(supabase_service_role_key=JWT)
    configure_logging(settings, stream=stream)

    logger.info("connecting to {}", DATABASE_URL)
    logging.getLogger("psycopg").warning("key %s and dsn host=db password=%s", JWT, DATABASE_PASSWORD)
    logger.bind(url=DATABASE_URL).info("settings are {}", settings)
    try:
        raise ValueError(f"cannot connect to {DATABASE_URL}")
    except ValueError:
        logger.exception("failed")

    text = stream.getvalue()
    assert DATABASE_PASSWORD not in text
    assert JWT.split(".")[1] not in text
    url_line, key_line, settings_line, failed = json_lines(stream)
    assert url_line["message"] == "connecting to postgresql://worker:***@127.0.0.1:1/queue"
    assert key_line["message"] == "key [redacted-jwt] and dsn host=db password=***"
    assert settings_line["url"] == "postgresql://worker:***@127.0.0.1:1/queue"
    assert "**********" in settings_line["message"]
    assert "postgresql://worker:***@127.0.0.1:1/queue" in failed["exception"]


@pytest.mark.parametrize(
    "connection_string",
    [
        "host=db password='{secret}' user=worker",
        'host=db password="{secret}" user=worker',
        "host=db password = '{secret} with spaces' user=worker",
        "host=db password='it\\'s {secret}' user=worker",
        "host=db password={secret} user=worker",
    ],
)
def test_quoted_passwords_of_keyword_connection_strings_are_redacted(connection_string: str) -> None:
    # libpq's keyword/value strings may quote a value with single quotes (backslash escapes a quote);
    # a password that holds spaces has to be quoted.
    text = connection_string.format(secret=DATABASE_PASSWORD)

    redacted = redact(text)

    assert DATABASE_PASSWORD not in redacted
    assert redacted.startswith("host=db password")
    assert redacted.endswith(" user=worker")


def test_development_lines_are_pretty_text() -> None:
    stream = io.StringIO()
    configure_logging(load_settings(app_env="development"), stream=stream)

    logger.bind(job_id="job-1").info("hello")

    [line] = stream.getvalue().splitlines()
    assert not line.startswith("{")
    assert " | INFO     | " in line
    assert line.endswith("hello  | job_id=job-1")
    assert "\x1b[" not in line


def test_development_lines_are_coloured_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    configure_logging(load_settings(app_env="development"), stream=stream)

    logger.warning("careful")

    assert "\x1b[" in stream.getvalue()
    assert "careful" in stream.getvalue()


def _cli_environment(**settings: str) -> dict[str, str]:
    names = set(Settings.model_fields)
    environment = {key: value for key, value in os.environ.items() if key.lower() not in names}
    environment.update(settings)
    return environment


def test_no_code_of_ours_runs_when_an_interpreter_of_the_environment_starts() -> None:
    # Logging is set up by our own processes (the launcher, the worker process, migrate), never by a hook that
    # every Python program of the environment would run at start-up.
    environment = _cli_environment(APP_ENV="production", DATABASE_URL=DATABASE_URL)
    packages = ("broker", "health", "jobs", "service", "tasks", "worker", "loguru")
    probe = f"import sys; print(sorted(name for name in sys.modules if name.split('.')[0] in {packages!r}))"

    result = subprocess.run(
        [sys.executable, "-c", probe], env=environment, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert result.stderr == ""
