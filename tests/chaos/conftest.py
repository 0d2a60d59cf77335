"""The chaos suite: real processes killed with SIGKILL, Redis restarted under running sagas,
command storms and hostile input. It reuses the integration fixtures (the session's isolated
Redis database, database and event tap); each test is bounded in time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.bootstrap import Container
from tests.integration.conftest import services, tap, workdir
from tests.support.private_redis import PrivateRedis
from tests.support.stack import fresh_rabbitmq_broker, rabbitmq_available
from tests.support.workers import WorkerGroup, start_workers

__all__ = ["broker", "services", "tap", "workdir", "worker"]


@pytest.fixture(scope="module")
def worker(services: Container, workdir: Path) -> Iterator[WorkerGroup]:
    """Per module, not per session: a chaos test that runs workers of its own must not find
    another module's worker consuming its saga queue."""
    group = start_workers(workdir, 1, concurrency=3)
    yield group
    group.stop()


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, workdir: Path) -> Iterator[tuple[str, str]]:
    """A broker of the test's own, each kind in turn: a private redis-server, a fresh RabbitMQ
    vhost. Both must keep the chaos suite's promises."""
    if request.param == "rabbitmq":
        if not rabbitmq_available():
            if os.environ.get("CI"):  # CI starts RabbitMQ (.ci/run): its absence is a failure
                pytest.fail("RabbitMQ is not running on 127.0.0.1:5672")
            pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")
        yield "rabbitmq", fresh_rabbitmq_broker()
        return
    private = PrivateRedis(workdir, f"broker-{request.node.originalname}").start()
    try:
        yield "redis", private.url(0)
    finally:
        private.stop()
