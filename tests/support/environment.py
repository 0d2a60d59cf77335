"""One isolated environment per test session: its own Redis database and its own database.

It is set up at conftest import, before anything reads the settings, because the Celery app and
the settings are built once per process from the environment.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import redis

REDIS_HOST_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
# Databases 1..15 are handed out to test sessions; 0 is the service's default.
CLAIM_KEY = "provisioner-tests:claim:{}"
CLAIM_TTL_S = 3 * 3600


def claim_redis_db() -> int:
    """Claim a Redis database number no other live test session uses, and empty it."""
    admin = redis.Redis.from_url(f"{REDIS_HOST_URL}/0")
    owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    in_use = {int(client["db"]) for client in admin.client_list() if "db" in client}
    for number in range(1, 16):
        if number in in_use:
            continue  # someone (a service run by hand, say) uses it without a claim
        if admin.set(CLAIM_KEY.format(number), owner, nx=True, ex=CLAIM_TTL_S):
            redis.Redis.from_url(f"{REDIS_HOST_URL}/{number}").flushdb()

            def release(key: str = CLAIM_KEY.format(number)) -> None:
                try:
                    if admin.get(key) == owner.encode():
                        admin.delete(key)
                except redis.RedisError:
                    pass

            atexit.register(release)
            return number
    raise RuntimeError("no free Redis database 1..15 for this test session")


# The PostgreSQL the machine runs (bin/test's default for TEST_DATABASE_URL too).
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_schema_url(base: str) -> tuple[str, str]:
    """A fresh schema in the PostgreSQL database ``base``, and a URL whose search_path is it."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')

    def drop() -> None:
        with psycopg.connect(plain, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    atexit.register(drop)
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}options=-csearch_path%3D{schema}", schema


def rabbitmq_vhost_url(base: str) -> str:
    """A fresh RabbitMQ virtual host for this session (queues of concurrent runs never mix)."""
    vhost = f"t_{uuid.uuid4().hex[:12]}"
    user = base.split("//", 1)[1].split(":", 1)[0] if "@" in base else "guest"
    subprocess.run(
        ["rabbitmqctl", "-q", "add_vhost", vhost], check=True, timeout=60, capture_output=True
    )
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
        check=True,
        timeout=60,
        capture_output=True,
    )

    def drop() -> None:
        subprocess.run(
            ["rabbitmqctl", "-q", "delete_vhost", vhost],
            timeout=60,
            capture_output=True,
            check=False,
        )

    atexit.register(drop)
    root = base.rstrip("/")
    return f"{root}/{vhost}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def prepare() -> dict[str, str]:
    """Set the PROVISIONER_* variables for this session; return them."""
    workdir = Path(tempfile.mkdtemp(prefix="provisioner-tests-"))
    number = claim_redis_db()
    redis_url = f"{REDIS_HOST_URL}/{number}"
    broker = os.environ.get("TEST_BROKER_URL") or redis_url
    if broker.startswith("amqp"):
        broker = rabbitmq_vhost_url(broker)
    database = os.environ.get("TEST_DATABASE_URL")
    if database:
        database, _schema = postgres_schema_url(database)
    else:
        database = f"sqlite:///{workdir}/provisioner.db"
    values = {
        "PROVISIONER_REDIS_URL": redis_url,
        "PROVISIONER_BROKER_URL": broker,
        "PROVISIONER_DATABASE_URL": database,
        "PROVISIONER_DATA_DIR": str(workdir / "data"),
        "PROVISIONER_STEP_BACKOFF_S": "0.05",
        "PROVISIONER_STEP_TRIES": "3",
        "PROVISIONER_MAX_RETRIES": "2",
        "PROVISIONER_CONSOLE_URL": "http://127.0.0.1:8080/console/{slug}",
        # `provisioner up` serves the API too: never on a port another session may hold.
        "PROVISIONER_API_BIND": f"127.0.0.1:{free_port()}",
        "TEST_WORKDIR": str(workdir),
    }
    os.environ.update(values)
    os.environ.pop("PROVISIONER_API_TOKEN", None)
    return values
