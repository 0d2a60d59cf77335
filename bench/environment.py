"""The bench's own world: a claimed Redis database, a work directory with a SQLite file (or a
fresh PostgreSQL schema), and, with ``--rabbitmq``, a RabbitMQ virtual host of its own.

Everything is set in ``os.environ`` before anything reads the settings: the Celery apps and the
settings are built once per process from the environment, and the bench's children inherit it.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis

from tests.support.environment import (
    CLAIM_KEY,
    CLAIM_TTL_S,
    DEFAULT_POSTGRES_URL,
    REDIS_HOST_URL,
    postgres_schema_url,
)

DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672"


@dataclass(frozen=True)
class BenchEnvironment:
    run_id: str
    workdir: Path
    redis_db: int
    redis_url: str
    broker_url: str
    database_url: str
    timing_dir: Path
    env: dict[str, str]

    @property
    def broker(self) -> str:
        return "rabbitmq" if self.broker_url.startswith("amqp") else "redis"

    @property
    def database(self) -> str:
        return "postgresql" if self.database_url.startswith("postgresql") else "sqlite"


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def _rabbitmq_vhost(run_id: str, stack: ExitStack) -> str:
    vhost = f"bench-{run_id}"
    _rabbitmqctl("add_vhost", vhost)
    stack.callback(_rabbitmqctl, "delete_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    base = urlsplit(os.environ.get("BENCH_RABBITMQ_URL", DEFAULT_RABBITMQ_URL))
    return f"{base.scheme}://{base.netloc}/{vhost}"  # any virtual host in it is replaced


def claim_redis_db(stack: ExitStack) -> int:
    """A Redis database (1-15) claimed the way test sessions claim theirs
    (``tests.support.environment.claim_redis_db``: the same keys, the same TTL), skipping any
    database another client is connected to: a process started by hand without a claim (a
    ``provisioner up`` on ``/5``) would otherwise take the bench's tasks, and be flushed."""
    admin = redis.Redis.from_url(f"{REDIS_HOST_URL}/0")
    in_use = {int(client.get("db", 0)) for client in admin.client_list()}
    owner = f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for number in range(1, 16):
        key = CLAIM_KEY.format(number)
        if number in in_use or not admin.set(key, owner, nx=True, ex=CLAIM_TTL_S):
            continue

        def release(key: str = key) -> None:
            with suppress(redis.RedisError):
                if admin.get(key) == owner.encode():
                    admin.delete(key)

        stack.callback(release)
        redis.Redis.from_url(f"{REDIS_HOST_URL}/{number}").flushdb()
        return number
    raise RuntimeError("no free Redis database 1..15 (claimed, or in use by another client)")


def _flush(url: str) -> None:
    with suppress(redis.RedisError):
        redis.Redis.from_url(url).flushdb()


def prepare(
    stack: ExitStack,
    *,
    workdir: Path,
    rabbitmq: bool,
    postgres: bool,
) -> BenchEnvironment:
    """Claim and create everything; ``stack`` undoes it (in reverse) when the bench ends."""
    run_id = uuid.uuid4().hex[:8]
    workdir.mkdir(parents=True, exist_ok=True)
    timing_dir = workdir / "timing"
    timing_dir.mkdir(exist_ok=True)
    number = claim_redis_db(stack)
    redis_url = f"{REDIS_HOST_URL}/{number}"
    stack.callback(_flush, redis_url)  # runs before the release: nothing of ours is left
    broker_url = _rabbitmq_vhost(run_id, stack) if rabbitmq else redis_url
    if postgres:
        base = os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
        database_url, _schema = postgres_schema_url(base)  # dropped at exit
    else:
        database_url = f"sqlite:///{workdir}/provisioner.db"
    env = {
        "PROVISIONER_REDIS_URL": redis_url,
        "PROVISIONER_BROKER_URL": broker_url,
        "PROVISIONER_DATABASE_URL": database_url,
        "PROVISIONER_DATA_DIR": str(workdir / "data"),
        # Only failing steps wait; the retry measure makes its tenants fail quickly.
        "PROVISIONER_STEP_BACKOFF_S": "0.05",
        "PROVISIONER_STEP_TRIES": "3",
        "PROVISIONER_MAX_RETRIES": "2",
        "BENCH_TIMING_DIR": str(timing_dir),
        # The service's metrics files (prometheus multiprocess), apart from anyone else's.
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
    }
    os.environ.pop("PROVISIONER_API_TOKEN", None)
    os.environ.update(env)
    return BenchEnvironment(
        run_id=run_id,
        workdir=workdir,
        redis_db=number,
        redis_url=redis_url,
        broker_url=broker_url,
        database_url=database_url,
        timing_dir=timing_dir,
        env=dict(os.environ),
    )
