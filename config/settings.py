"""The service's settings: exactly the ``PROVISIONER_*`` variables of the public contract.

A bad value fails at start with one line naming the variable, because an operator reading a
crash-looping container's log should not have to decode a pydantic traceback.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "PROVISIONER_"

BROKER_SCHEMES = frozenset({"redis", "rediss", "amqp", "pyamqp", "amqps"})
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
DATABASE_SCHEMES = frozenset({"sqlite", "postgresql+psycopg"})


class SettingsError(ValueError):
    """A setting has a value the service cannot start with; ``str()`` is one line."""


def _check_scheme(url: str, allowed: frozenset[str]) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in allowed:
        raise ValueError(
            f"unknown scheme {scheme or '(none)'!r} in {url!r}; expected one of "
            + ", ".join(sorted(allowed))
        )
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    broker_url: str = "redis://localhost:6379/0"
    redis_url: str = "redis://localhost:6379/0"
    database_url: str = "sqlite:///var/provisioner.db"
    max_retries: int = Field(default=2, ge=0)
    step_tries: int = Field(default=3, ge=1)
    step_backoff_s: float = Field(default=2.0, ge=0)
    api_token: SecretStr | None = None
    data_dir: Path = Path("var")
    api_bind: str = "127.0.0.1:8080"
    console_url: str = "http://127.0.0.1:8080/console/{slug}"

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str) -> str:
        return _check_scheme(value, BROKER_SCHEMES)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        return _check_scheme(value, REDIS_SCHEMES)

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        return _check_scheme(value, DATABASE_SCHEMES)

    @field_validator("api_token")
    @classmethod
    def _blank_token_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty PROVISIONER_API_TOKEN= must not become a token that "" satisfies.
        if value is not None and not value.get_secret_value().strip():
            return None
        return value

    @field_validator("api_bind")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value

    @field_validator("console_url")
    @classmethod
    def _console_template(cls, value: str) -> str:
        if "{slug}" not in value:
            raise ValueError(f"must contain '{{slug}}', got {value!r}")
        return value

    @property
    def api_host(self) -> str:
        return self.api_bind.rpartition(":")[0]

    @property
    def api_port(self) -> int:
        return int(self.api_bind.rpartition(":")[2])

    def console_url_for(self, slug: str) -> str:
        return self.console_url.replace("{slug}", slug)


def load_settings(**overrides: object) -> Settings:
    """Read the environment; raise :class:`SettingsError` with one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise SettingsError(f"{ENV_PREFIX}{field.upper()}: {message}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
