"""Logging for the worker service: loguru, pretty in development, one JSON object per line in production.

Standard `logging` (Dramatiq, psycopg, httpx) is routed into the same loguru sink, every line written while a
job runs carries the job's ids (see `broker.log_context`), and credentials are redacted from every line.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import sys
import traceback
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger

from broker.log_context import current_job_context
from service.errors import ConfigurationError
from service.settings import AppEnv, LogLevel, Settings, configured_app_env

if TYPE_CHECKING:
    from loguru import Message, Record, RecordException

#: A pretty line for people: time, level, logger name, message, then the bound fields.
_DEV_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
    "<cyan>{name}</cyan> - <level>{message}</level><dim>{extra[_fields]}</dim>\n{extra[_exception]}"
)
#: Keys of a JSON line; a bound field with one of these names is written as "extra_<name>".
_JSON_KEYS = frozenset({"ts", "level", "logger", "message", "exception"})

_REDACTED = "***"
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # The password of any scheme://user:password@host URL (postgresql://, redis://, amqp://).
    (re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@'\"]*:)[^\s'\"]*@"), rf"\g<1>{_REDACTED}@"),
    # libpq keyword connection strings: "host=db password=secret", or quoted: password='it\'s secret'.
    (
        re.compile(
            r"\b(password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s'\",;]+)", re.IGNORECASE
        ),
        rf"\g<1>{_REDACTED}",
    ),
    # JWTs, such as Supabase's anon and service role keys: header.payload[.signature].
    (re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]*)?"), "[redacted-jwt]"),
    # Supabase's newer secret API keys.
    (re.compile(r"\bsb_secret_[A-Za-z0-9_\-]+"), "[redacted-key]"),
)


def redact(text: str) -> str:
    """The text with URL passwords, JWTs and API keys masked: the last line of defence for credentials."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def loguru_level(level: LogLevel) -> str:
    """The loguru level name for a LOG_LEVEL value; fatal is an alias of critical."""
    if level is LogLevel.fatal:
        return "CRITICAL"
    return level.value.upper()


#: Libraries that log every request at INFO; they speak at WARNING and above.
CHATTY_LOGGERS = ("httpx", "httpcore", "hpack")


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> None:
    """Send every log line, loguru's and the standard library's, to one sink; safe to call again.

    Without `stream` the lines go to whatever `sys.stderr` is when each line is written: the dramatiq CLI
    swaps it for a pipe in its worker processes after they inherit this configuration from the main one.
    """
    level = loguru_level(settings.log_level)
    logger.remove()
    logger.configure(patcher=_add_job_context_and_redact)
    if settings.is_production:
        logger.add(_JsonSink(stream), level=level, format=_bare_message, backtrace=False, diagnose=False)
    else:
        logger.add(
            _TextSink(stream),
            level=level,
            format=_dev_format,
            # The worker processes write into a pipe that the main process copies to its own stderr.
            colorize=_is_terminal(stream if stream is not None else sys.__stderr__),
            backtrace=False,
            # Variable values in tracebacks could hold credentials.
            diagnose=False,
        )
    # force=True replaces any handler set up before us; the dramatiq CLI's basicConfig then does nothing.
    logging.basicConfig(handlers=[InterceptHandler()], level=logger.level(level).no, force=True)
    logging.captureWarnings(True)
    for name in CHATTY_LOGGERS:
        # One line per HTTP request of the REST transport would drown the job lines.
        logging.getLogger(name).setLevel(max(logging.WARNING, logger.level(level).no))


def report_configuration_error(
    exc: ConfigurationError, *, logger_name: str, stream: TextIO | None = None
) -> None:
    """Say what is wrong with the settings, which may be why logging could not be set up: one JSON line (every
    problem in `problems`) when APP_ENV says production, the plain list otherwise."""
    out = stream or sys.__stderr__ or sys.stderr
    if configured_app_env() == AppEnv.production.value:
        problems = [redact(problem) for problem in exc.problems]
        line = {
            "ts": _utc_timestamp(datetime.now(UTC)),
            "level": "CRITICAL",
            "logger": logger_name,
            "message": f"Invalid configuration ({len(problems)} problem(s)): {'; '.join(problems)}",
            "problems": problems,
        }
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":"))
    else:
        text = redact(exc.render())
    out.write(text + "\n")
    out.flush()


class InterceptHandler(logging.Handler):
    """Hands standard `logging` records to loguru, keeping the stdlib logger's name (loguru's README)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        try:
            message = record.getMessage()
        except Exception:
            self.handleError(record)
            return

        # Point loguru at the code that called logging, not at the logging module itself.
        frame: FrameType | None = inspect.currentframe()
        depth = 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame = frame.f_back
            depth += 1

        name = record.name

        def keep_name(loguru_record: Record) -> None:
            loguru_record["name"] = name

        logger.opt(depth=depth, exception=record.exc_info).patch(keep_name).log(level, message)


def _add_job_context_and_redact(record: Record) -> None:
    for key, value in current_job_context().items():
        record["extra"].setdefault(key, value)
    record["message"] = redact(record["message"])


def _bare_message(record: Record) -> str:
    # A callable format, so loguru does not render the traceback itself: the JSON sink does.
    return "{message}"


def _dev_format(record: Record) -> str:
    extra = record["extra"]
    shown = {key: value for key, value in extra.items() if not key.startswith("_")}
    fields = "".join(f" {key}={_field_text(value)}" for key, value in shown.items())
    extra["_fields"] = f"  |{fields}" if fields else ""
    exception = _exception_text(record["exception"])
    extra["_exception"] = f"{exception}\n" if exception else ""
    return _DEV_FORMAT


def render_json(record: Record) -> str:
    """One compact JSON object for a record: ts, level, logger, message, the bound fields, exception."""
    line: dict[str, Any] = {
        "ts": _utc_timestamp(record["time"]),
        "level": record["level"].name,
        "logger": record["name"],
        "message": record["message"],
    }
    for key, value in record["extra"].items():
        line[f"extra_{key}" if key in _JSON_KEYS else key] = _json_value(value)
    exception = _exception_text(record["exception"])
    if exception:
        line["exception"] = exception
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


class _TextSink:
    """Writes each formatted line with one write call, so lines from several processes never interleave."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def __call__(self, message: Message) -> None:
        self._write(str(message))

    def _write(self, text: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(text)
        stream.flush()


class _JsonSink(_TextSink):
    def __call__(self, message: Message) -> None:
        self._write(render_json(message.record) + "\n")


def _utc_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _exception_text(exception: RecordException | None) -> str:
    if exception is None or exception.value is None:
        return ""
    lines = traceback.format_exception(exception.type, exception.value, exception.traceback)
    return redact("".join(lines).rstrip("\n"))


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    # str() of a pydantic SecretStr is "**********", never the secret.
    return redact(str(value))


def _field_text(value: object) -> str:
    return "-" if value is None else redact(str(value))


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False
