"""Settings: defaults, the .env file, transport selection, and one message listing every problem."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from service.embedded_db import EmbeddedDatabaseUnavailable, start_embedded_postgres
from service.errors import ConfigurationError
from service.settings import AppEnv, LogLevel, TransportKind, load_settings

DATABASE_PASSWORD = "s3cret-database-password"
DATABASE_URL = f"postgresql://worker:{DATABASE_PASSWORD}@db.example.test:5432/queue"
SERVICE_ROLE_KEY = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2VydmljZS1yb2xlLXNpZ25hdHVyZQ"
SUPABASE_URL = "https://project.supabase.test"


pytestmark = pytest.mark.usefixtures("isolated_environment")


def problems_of(monkeypatch: pytest.MonkeyPatch, **environment: str) -> list[str]:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    return caught.value.problems


def test_defaults() -> None:
    settings = load_settings()

    assert settings.poll_interval_ms == 10_000
    assert settings.max_concurrent_jobs == 1
    assert settings.shutdown_timeout_ms == 20_000
    assert settings.health_check_port == 8080
    assert settings.log_level is LogLevel.info
    assert settings.app_env is AppEnv.development
    assert settings.database_url is None
    assert not settings.is_production


def test_environment_variables_are_read_case_insensitively(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLL_INTERVAL_MS", "250")
    monkeypatch.setenv("log_level", "fatal")
    monkeypatch.setenv("MAX_CONCURRENT_JOBS", "4")

    settings = load_settings()

    assert settings.poll_interval_ms == 250
    assert settings.log_level is LogLevel.fatal
    assert settings.max_concurrent_jobs == 4


def test_the_env_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        f"APP_ENV=production\nDATABASE_URL={DATABASE_URL}\nSHUTDOWN_TIMEOUT_MS=5000\nLOG_LEVEL=trace\n"
    )

    settings = load_settings()

    assert settings.is_production
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == DATABASE_URL
    assert settings.shutdown_timeout_ms == 5000
    assert settings.log_level is LogLevel.trace


def test_the_environment_wins_over_the_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("POLL_INTERVAL_MS=5000\n")
    monkeypatch.setenv("POLL_INTERVAL_MS", "750")

    assert load_settings().poll_interval_ms == 750


def test_every_invalid_value_is_listed_in_one_message(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = problems_of(
        monkeypatch,
        POLL_INTERVAL_MS="often",
        MAX_CONCURRENT_JOBS="0",
        HEALTH_CHECK_PORT="70000",
        LOG_LEVEL="loud",
        APP_ENV="staging",
    )

    assert [problem.split(":")[0] for problem in problems] == [
        "POLL_INTERVAL_MS",
        "MAX_CONCURRENT_JOBS",
        "HEALTH_CHECK_PORT",
        "LOG_LEVEL",
        "APP_ENV",
    ]


def test_a_missing_database_url_is_listed_with_the_invalid_values(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pydantic skips the cross-field rules once a field is invalid; load_settings must still report them.
    problems = problems_of(monkeypatch, APP_ENV="production", POLL_INTERVAL_MS="10")

    assert problems == [
        "POLL_INTERVAL_MS: Input should be greater than or equal to 50",
        "DATABASE_URL: required outside development (or set SUPABASE_URL and the key)",
    ]


def test_an_invalid_database_url_is_not_also_called_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = problems_of(
        monkeypatch,
        APP_ENV="production",
        DATABASE_URL=f"mysql://worker:{DATABASE_PASSWORD}@db/queue",
        SHUTDOWN_TIMEOUT_MS="-1",
    )

    assert problems == [
        "DATABASE_URL: must be a postgresql:// URL",
        "SHUTDOWN_TIMEOUT_MS: Input should be greater than or equal to 0",
    ]


def test_an_invalid_supabase_url_still_asks_for_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = problems_of(monkeypatch, APP_ENV="production", SUPABASE_URL="not a url")

    assert [problem.split(":")[0] for problem in problems] == ["SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"]


def test_the_message_lists_each_problem_on_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("JOB_LEASE_MS", "1")

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert str(caught.value).splitlines() == [
        "Invalid configuration (2 problem(s)):",
        "  - JOB_LEASE_MS: Input should be greater than or equal to 1000",
        "  - DATABASE_URL: required outside development (or set SUPABASE_URL and the key)",
    ]


def test_secrets_are_not_in_the_settings_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)

    settings = load_settings()

    for text in (repr(settings), str(settings), str(settings.model_dump())):
        assert DATABASE_PASSWORD not in text
        assert SERVICE_ROLE_KEY not in text
        assert "**********" in text


def test_secrets_are_not_in_the_error_text(monkeypatch: pytest.MonkeyPatch) -> None:
    bad_url = f"mysql://worker:{DATABASE_PASSWORD}@db/queue"
    monkeypatch.setenv("DATABASE_URL", bad_url)
    monkeypatch.setenv("SUPABASE_URL", f"not a url {SERVICE_ROLE_KEY}")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
    monkeypatch.setenv("POLL_INTERVAL_MS", DATABASE_PASSWORD)

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    text = f"{caught.value} {caught.value!r} {caught.value.problems}"
    assert len(caught.value.problems) == 3
    assert DATABASE_PASSWORD not in text
    assert SERVICE_ROLE_KEY not in text
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_development_without_credentials_uses_the_embedded_database() -> None:
    settings = load_settings()

    assert settings.transport is TransportKind.postgres
    assert settings.uses_embedded_database


def test_a_database_url_selects_the_postgres_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("SUPABASE_URL", SUPABASE_URL)

    settings = load_settings()

    assert settings.transport is TransportKind.postgres
    assert not settings.uses_embedded_database


def test_the_supabase_pair_alone_selects_the_rest_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("SUPABASE_URL", SUPABASE_URL)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)

    settings = load_settings()

    assert settings.transport is TransportKind.rest
    assert not settings.uses_embedded_database


def test_an_explicit_queue_transport_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUEUE_TRANSPORT", "rest")
    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("SUPABASE_URL", SUPABASE_URL)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)

    assert load_settings().transport is TransportKind.rest


def test_the_rest_transport_needs_the_url_and_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = problems_of(monkeypatch, QUEUE_TRANSPORT="rest")

    assert problems == [
        "SUPABASE_URL: required for the REST transport",
        "SUPABASE_SERVICE_ROLE_KEY: required for the REST transport",
    ]


def test_production_needs_a_database_or_a_supabase_project(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = problems_of(monkeypatch, APP_ENV="production")

    assert problems == ["DATABASE_URL: required outside development (or set SUPABASE_URL and the key)"]


def test_an_empty_database_url_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "")

    settings = load_settings()

    assert settings.database_url is None
    assert settings.uses_embedded_database


def test_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLL_INTERVAL_MS", "often")

    assert load_settings(poll_interval_ms=100).poll_interval_ms == 100


def test_an_empty_value_in_the_environment_wins_over_the_env_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a .env with a database and a poll interval, and the same names set empty in the environment
    (tmp_path / ".env").write_text(f"DATABASE_URL={DATABASE_URL}\nPOLL_INTERVAL_MS=5000\n")
    monkeypatch.setenv("DATABASE_URL", "")
    monkeypatch.setenv("POLL_INTERVAL_MS", "")

    settings = load_settings()

    # Then the environment wins, and empty means "not set": the defaults apply
    assert settings.database_url is None
    assert settings.poll_interval_ms == 10_000


def test_an_empty_value_in_the_env_file_means_the_default(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SUPABASE_URL=\nQUEUE_TRANSPORT=\nRUN_DIR=\nPOLL_INTERVAL_MS=\n")

    settings = load_settings()

    assert settings.supabase_url is None
    assert settings.queue_transport is None
    assert settings.run_dir is None
    assert settings.poll_interval_ms == 10_000


def test_a_misspelt_setting_in_the_env_file_is_reported_with_the_likely_name(tmp_path: Path) -> None:
    # Given a .env with a typo, beside a variable of another tool that shares the file
    (tmp_path / ".env").write_text(
        "POLL_INTERVL_MS=500\nmax_concurent_jobs=4\nNEXT_PUBLIC_SITE_URL=https://x\n"
    )

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    # Then both typos are problems that name the setting meant; the other tool's variable is left alone
    assert caught.value.problems == [
        "POLL_INTERVL_MS (in .env): not a setting; did you mean POLL_INTERVAL_MS?",
        "MAX_CONCURENT_JOBS (in .env): not a setting; did you mean MAX_CONCURRENT_JOBS?",
    ]


def test_without_pgserver_the_embedded_database_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Production images do not ship pgserver; asking them for the embedded database says what is missing.
    monkeypatch.setitem(sys.modules, "pgserver", None)  # what `import pgserver` finds when it is absent

    with pytest.raises(EmbeddedDatabaseUnavailable, match=r"supabase-queue-worker\[embedded\]"):
        start_embedded_postgres(tmp_path / "postgres")


def test_the_operator_settings_default_to_a_week_a_month_and_no_dashboard() -> None:
    settings = load_settings()

    assert (settings.completed_retention_days, settings.failed_retention_days) == (7, 30)
    assert settings.dashboard_port is None and settings.dashboard_token is None


def test_the_dashboard_needs_a_port_of_its_own_and_its_token_stays_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert problems_of(monkeypatch, DASHBOARD_PORT="8080") == [
        "DASHBOARD_PORT: must differ from HEALTH_CHECK_PORT"
    ]

    monkeypatch.setenv("DASHBOARD_PORT", "8081")
    monkeypatch.setenv("DASHBOARD_TOKEN", "a-dashboard-token")
    settings = load_settings()
    assert "a-dashboard-token" not in repr(settings) and "a-dashboard-token" not in str(settings)
