"""The service's one typed settings object, read from the environment and `.env`."""

from __future__ import annotations

import difflib
import enum
import os
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic import (
    AnyHttpUrl,
    Field,
    PostgresDsn,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.defaults import (
    DEFAULT_COMPLETED_RETENTION_DAYS,
    DEFAULT_FAILED_RETENTION_DAYS,
    DEFAULT_LEASE_MS,
    DEFAULT_MAX_RESCUES,
    DEFAULT_POLL_INTERVAL_MS,
    DEFAULT_UNKNOWN_ACTOR_GRACE_MS,
)
from service.errors import ConfigurationError

#: The port of /health, /ready and /metrics (HEALTH_CHECK_PORT); the container's probe reads it too.
DEFAULT_HEALTH_CHECK_PORT = 8080
#: Milliseconds /ready, and a /metrics read of the queue's statistics, wait for the database.
DEFAULT_READINESS_TIMEOUT_MS = 2_000


class AppEnv(enum.StrEnum):
    development = "development"
    production = "production"
    test = "test"


class LogLevel(enum.StrEnum):
    trace = "trace"
    debug = "debug"
    info = "info"
    success = "success"
    warning = "warning"
    error = "error"
    critical = "critical"
    fatal = "fatal"


class TransportKind(enum.StrEnum):
    postgres = "postgres"
    rest = "rest"


class _CrossFieldProblems(ValueError):
    """Raised by the model validator; carries the (field, problem) pairs so they can be merged."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field.upper()}: {problem}" for field, problem in problems))


class Settings(BaseSettings):
    """Every setting of the worker service; built once at an entry point and passed down."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        hide_input_in_errors=True,
        # Empty values are read, so that an empty variable in the environment still wins over .env; the
        # validator below then treats empty as "not set", as .env.example does.
        env_ignore_empty=False,
    )

    database_url: SecretStr | None = None
    supabase_url: AnyHttpUrl | None = None
    supabase_service_role_key: SecretStr | None = None
    #: "postgres" or "rest"; inferred from which credentials are set when empty.
    queue_transport: TransportKind | None = None
    #: Behave as behind a transaction-mode pooler (no LISTEN, no prepared statements) without detecting it.
    database_poll_only: bool = False
    #: Pooled connections per worker process; empty: 2 for one thread, 3 for more (service/budget.py).
    database_pool_size: int | None = Field(None, ge=1, le=64)

    poll_interval_ms: int = Field(DEFAULT_POLL_INTERVAL_MS, ge=50, le=3_600_000)
    max_concurrent_jobs: int = Field(1, ge=1, le=256)
    #: Jobs a worker process may claim beyond its free threads. 0: it never holds a job it cannot start, so
    #: an idle container takes the next long job; raise it for many short jobs (more throughput).
    claim_ahead_jobs: int = Field(0, ge=0, le=10_000)
    #: Worker processes per container (`--processes`); scale out by adding containers.
    worker_processes: int = Field(1, ge=1, le=64)
    #: How long running jobs may take to finish after SIGTERM before they are stopped and handed back. With
    #: the stop steps after it, a shutdown takes at most this plus ~7 s: inside Kubernetes' 30 s default.
    shutdown_timeout_ms: int = Field(20_000, ge=0, le=3_600_000)
    #: How long a claimed job stays ours without a lease extension.
    job_lease_ms: int = Field(DEFAULT_LEASE_MS, ge=1_000, le=86_400_000)
    #: Times a job may lose its worker (killed, OOM, frozen past its lease) before it is dead-lettered.
    max_rescues: int = Field(DEFAULT_MAX_RESCUES, ge=1, le=1_000)
    #: How long a job naming an actor no worker knows is offered again before it fails (rolling deploys).
    unknown_actor_grace_ms: int = Field(DEFAULT_UNKNOWN_ACTOR_GRACE_MS, ge=0, le=86_400_000)
    #: Days completed and cancelled jobs are kept; the workers delete older ones. 0 keeps them forever.
    completed_retention_days: int = Field(DEFAULT_COMPLETED_RETENTION_DAYS, ge=0, le=36_500)
    #: Days failed jobs (the dead letters) are kept; the workers delete older ones. 0 keeps them forever.
    failed_retention_days: int = Field(DEFAULT_FAILED_RETENTION_DAYS, ge=0, le=36_500)
    health_check_port: int = Field(DEFAULT_HEALTH_CHECK_PORT, ge=1, le=65535)
    #: Folder where worker processes write heartbeat files for the health server; empty means `.data/run`
    #: in development and test, `/tmp/worker-run` otherwise. Worker and health server must agree on it.
    run_dir: Path | None = None
    #: Liveness window: a worker whose consumer has not ticked for this long makes /health answer 503.
    heartbeat_stale_ms: int = Field(30_000, ge=2_000, le=3_600_000)
    #: How long one get_queue_stats() read serves /metrics and the queue monitor.
    stats_cache_ms: int = Field(5_000, ge=0, le=3_600_000)
    #: How long /ready waits for the queue's database to answer.
    readiness_timeout_ms: int = Field(DEFAULT_READINESS_TIMEOUT_MS, ge=100, le=60_000)
    #: How often the queue monitor logs one line of queue statistics.
    queue_stats_interval_ms: int = Field(30_000, ge=100, le=86_400_000)
    #: Port of the operator's dashboard; empty: no dashboard.
    dashboard_port: int | None = Field(None, ge=1, le=65535)
    #: The token that allows the dashboard's actions (retry, cancel, pause); empty: a read-only dashboard.
    dashboard_token: SecretStr | None = None
    log_level: LogLevel = LogLevel.info
    app_env: AppEnv = AppEnv.development

    #: How long the simulated coding job sleeps.
    coding_job_duration_ms: int = Field(2_000, ge=0, le=86_400_000)
    #: Where the embedded PostgreSQL keeps its data in development.
    embedded_database_dir: Path = Path(".data/postgres")

    @model_validator(mode="before")
    @classmethod
    def _empty_means_unset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {
            key: value for key, value in data.items() if not (isinstance(value, str) and not value.strip())
        }

    @field_validator("database_url")
    @classmethod
    def _postgres_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        try:
            PostgresDsn(value.get_secret_value())
        except ValidationError:
            raise ValueError("must be a postgresql:// URL") from None
        return value

    @model_validator(mode="after")
    def _transport_is_configured(self) -> Settings:
        problems = self.cross_field_problems()
        if problems:
            raise _CrossFieldProblems(problems)
        return self

    def cross_field_problems(self) -> list[tuple[str, str]]:
        """The (field, problem) pairs of the rules that span several settings, such as the transport's."""
        problems: list[tuple[str, str]] = []
        kind = self.transport
        if kind is TransportKind.rest:
            if self.supabase_url is None:
                problems.append(("supabase_url", "required for the REST transport"))
            if self.supabase_service_role_key is None:
                problems.append(("supabase_service_role_key", "required for the REST transport"))
        elif kind is TransportKind.postgres and self.database_url is None and not self.uses_embedded_database:
            problems.append(
                ("database_url", "required outside development (or set SUPABASE_URL and the key)")
            )
        if self.dashboard_port is not None and self.dashboard_port == self.health_check_port:
            problems.append(("dashboard_port", "must differ from HEALTH_CHECK_PORT"))
        return problems

    @property
    def transport(self) -> TransportKind:
        """The transport in use: explicit QUEUE_TRANSPORT wins, then DATABASE_URL, then the REST pair."""
        if self.queue_transport is not None:
            return self.queue_transport
        if self.database_url is None and self.supabase_url is not None:
            return TransportKind.rest
        return TransportKind.postgres

    @property
    def uses_embedded_database(self) -> bool:
        """True in development when no database or Supabase project is configured."""
        return (
            self.app_env is AppEnv.development
            and self.database_url is None
            and self.supabase_url is None
            and self.queue_transport is not TransportKind.rest
        )

    @property
    def is_production(self) -> bool:
        return self.app_env is AppEnv.production

    @property
    def run_path(self) -> Path:
        """RUN_DIR, or its default: `.data/run` beside the embedded database in development and test,
        `/tmp/worker-run` in production (writable by the container's non-root user)."""
        if self.run_dir is not None:
            return self.run_dir
        if self.app_env is AppEnv.production:
            return Path("/tmp/worker-run")
        return Path(".data/run")


#: Valid stand-ins for invalid optional settings whose mere presence changes the cross-field rules.
_PRESENT_STAND_INS: dict[str, str] = {
    "database_url": "postgresql://stand-in.invalid/stand_in",
    "supabase_url": "https://stand-in.invalid",
}


def _describe(error: Any) -> str:
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "__root__")
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    if location:
        return f"{location.upper()}: {message}"
    return message


def _cross_field_error(error: Any) -> _CrossFieldProblems | None:
    cause = error.get("ctx", {}).get("error")
    return cause if isinstance(cause, _CrossFieldProblems) else None


#: How close an unknown name in .env must be to a setting's name to be reported as a misspelling of it.
_MISSPELLING_CUTOFF = 0.85


def misspelt_env_file_names(env_file: Path = Path(".env")) -> list[str]:
    """Problems for the names in `env_file` that are not settings but nearly are (a typo would otherwise
    leave the setting at its default, silently). Other names are left alone: tools may share the file."""
    if not env_file.is_file():
        return []
    names = list(Settings.model_fields)
    problems: list[str] = []
    for key in dotenv_values(env_file, encoding="utf-8"):
        if key.lower() in names:
            continue
        close = difflib.get_close_matches(key.lower(), names, n=1, cutoff=_MISSPELLING_CUTOFF)
        if close:
            problems.append(f"{key.upper()} (in {env_file}): not a setting; did you mean {close[0].upper()}?")
    return problems


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, or raise ConfigurationError listing every problem at once."""
    misspelt = misspelt_env_file_names()
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
    else:
        if misspelt:
            raise ConfigurationError(misspelt)
        return settings
    problems: list[str] = []
    for error in errors:
        problems.extend(part.strip() for part in _describe(error).split(";"))
    invalid = {str(error["loc"][0]) for error in errors if error.get("loc")}
    if invalid and not any(_cross_field_error(error) for error in errors):
        problems.extend(_cross_field_problems_despite(invalid, overrides))
    raise ConfigurationError(problems + misspelt) from None


def _cross_field_problems_despite(invalid: set[str], overrides: dict[str, Any]) -> list[str]:
    # Pydantic skips model validators once a field is invalid, so check the cross-field rules again with
    # each invalid field replaced by a valid stand-in, and keep the problems about the other fields.
    stand_ins: dict[str, Any] = {}
    for name in invalid & Settings.model_fields.keys():
        field = Settings.model_fields[name]
        stand_ins[name] = _PRESENT_STAND_INS.get(name, field.get_default(call_default_factory=True))
    try:
        Settings(**{**overrides, **stand_ins})
    except ValidationError as exc:
        found: list[str] = []
        for error in exc.errors(include_input=False, include_url=False):
            cross_field = _cross_field_error(error)
            if cross_field is not None:
                kept = [(field, problem) for field, problem in cross_field.problems if field not in invalid]
                found.extend(f"{field.upper()}: {problem}" for field, problem in kept)
        return found
    return []


def configured_app_env() -> str:
    """APP_ENV as the environment (first) or .env sets it, read without the other settings, which may be
    the invalid ones: how to report a configuration error depends on it."""
    for key, value in os.environ.items():
        if key.lower() == "app_env":
            return value.strip().lower() or AppEnv.development.value
    env_file = Path(".env")
    if env_file.is_file():
        for name, found in dotenv_values(env_file, encoding="utf-8").items():
            if name.lower() == "app_env" and found and found.strip():
                return found.strip().lower()
    return AppEnv.development.value


class ProbeSettings(BaseSettings):
    """Just what the container's health probe needs: it runs without the worker's secrets."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        env_ignore_empty=True,
    )

    health_check_port: int = Field(DEFAULT_HEALTH_CHECK_PORT, ge=1, le=65535)
