"""The chaos suite: real processes killed with SIGKILL, Redis restarted under running sagas,
command storms and hostile input. It reuses the integration fixtures (the session's isolated
Redis database, database and event tap); each test is bounded in time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.bootstrap import Container
from tests.integration.conftest import services, tap, workdir
from tests.support.workers import WorkerGroup, start_workers

__all__ = ["services", "tap", "workdir", "worker"]


@pytest.fixture(scope="module")
def worker(services: Container, workdir: Path) -> Iterator[WorkerGroup]:
    """Per module, not per session: a chaos test that runs workers of its own must not find
    another module's worker consuming its saga queue."""
    group = start_workers(workdir, 1, concurrency=3)
    yield group
    group.stop()
