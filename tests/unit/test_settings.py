"""Settings: exactly the contract's variables and defaults; a bad value is one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import Settings, SettingsError, load_settings

CONTRACT_DEFAULTS = {
    "broker_url": "redis://localhost:6379/0",
    "redis_url": "redis://localhost:6379/0",
    "database_url": "sqlite:///var/provisioner.db",
    "max_retries": 2,
    "step_tries": 3,
    "step_backoff_s": 2.0,
    "api_token": None,
    "data_dir": Path("var"),
    "api_bind": "127.0.0.1:8080",
    "console_url": "http://127.0.0.1:8080/console/{slug}",
}


def test_defaults_are_the_contracts(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("PROVISIONER_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert {name: getattr(settings, name) for name in CONTRACT_DEFAULTS} == CONTRACT_DEFAULTS
    assert set(Settings.model_fields) == set(CONTRACT_DEFAULTS)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "PROVISIONER_BROKER_URL",
            "kafka://x:9092",
            "PROVISIONER_BROKER_URL: unknown scheme 'kafka'",
        ),
        ("PROVISIONER_DATABASE_URL", "mysql://x/db", "PROVISIONER_DATABASE_URL: unknown scheme"),
        ("PROVISIONER_REDIS_URL", "http://x", "PROVISIONER_REDIS_URL: unknown scheme 'http'"),
        ("PROVISIONER_STEP_TRIES", "-1", "PROVISIONER_STEP_TRIES: "),
        ("PROVISIONER_MAX_RETRIES", "many", "PROVISIONER_MAX_RETRIES: "),
        ("PROVISIONER_STEP_BACKOFF_S", "-0.5", "PROVISIONER_STEP_BACKOFF_S: "),
        ("PROVISIONER_API_BIND", "8080", "PROVISIONER_API_BIND: expected HOST:PORT"),
        ("PROVISIONER_CONSOLE_URL", "http://x/console", "PROVISIONER_CONSOLE_URL: must contain"),
    ],
)
def test_a_bad_value_names_the_variable_in_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_postgres_and_amqp_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVISIONER_BROKER_URL", "amqp://guest:guest@localhost:5672//")
    monkeypatch.setenv("PROVISIONER_DATABASE_URL", "postgresql+psycopg://u@h/db")
    settings = load_settings()
    assert settings.broker_url.startswith("amqp://")


def test_a_blank_api_token_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVISIONER_API_TOKEN", "  ")
    assert load_settings().api_token is None


def test_the_cli_fails_at_start_with_one_line(tmp_path: Path) -> None:
    env = {"PROVISIONER_STEP_TRIES": "-3", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "service", "list"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "PROVISIONER_STEP_TRIES" in lines[0]
