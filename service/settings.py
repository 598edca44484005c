"""The service's one typed settings object, read from the environment and `.env`."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

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

from service.errors import ConfigurationError


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


class Settings(BaseSettings):
    """Every setting of the worker service; built once at an entry point and passed down."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        hide_input_in_errors=True,
    )

    database_url: SecretStr | None = None
    supabase_url: AnyHttpUrl | None = None
    supabase_service_role_key: SecretStr | None = None
    #: "postgres" or "rest"; inferred from which credentials are set when empty.
    queue_transport: TransportKind | None = None
    #: Poll-only mode for transaction-mode poolers (no LISTEN, no prepared statements).
    database_poll_only: bool = False

    poll_interval_ms: int = Field(10_000, ge=50, le=3_600_000)
    max_concurrent_jobs: int = Field(1, ge=1, le=256)
    shutdown_timeout_ms: int = Field(30_000, ge=0, le=3_600_000)
    #: How long a claimed job stays ours without a lease extension.
    job_lease_ms: int = Field(60_000, ge=1_000, le=86_400_000)
    health_check_port: int = Field(8080, ge=1, le=65535)
    log_level: LogLevel = LogLevel.info
    app_env: AppEnv = AppEnv.development

    #: How long the simulated coding job sleeps.
    coding_job_duration_ms: int = Field(2_000, ge=0, le=86_400_000)
    #: Where the embedded PostgreSQL keeps its data in development.
    embedded_database_dir: Path = Path(".data/postgres")

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
        problems: list[str] = []
        kind = self.transport
        if kind is TransportKind.rest:
            if self.supabase_url is None:
                problems.append("SUPABASE_URL: required for the REST transport")
            if self.supabase_service_role_key is None:
                problems.append("SUPABASE_SERVICE_ROLE_KEY: required for the REST transport")
        elif kind is TransportKind.postgres and self.database_url is None and not self.uses_embedded_database:
            problems.append("DATABASE_URL: required outside development (or set SUPABASE_URL and the key)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

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


def _describe(error: Any) -> str:
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "__root__")
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    if location:
        return f"{location.upper()}: {message}"
    return message


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, or raise ConfigurationError listing every problem at once."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems: list[str] = []
        for error in exc.errors(include_input=False, include_url=False):
            problems.extend(part.strip() for part in _describe(error).split(";"))
        raise ConfigurationError(problems) from None
