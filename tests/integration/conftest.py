"""Real Redis, a real Celery worker (subprocess), a real database and a real event subscriber."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from config.settings import get_settings
from service.bootstrap import Container, build_container
from service.publisher import Publisher
from tests.support.events import EventTap
from tests.support.workers import WorkerGroup, start_workers, worker_count


@pytest.fixture(scope="session")
def workdir() -> Path:
    import os

    return Path(os.environ["TEST_WORKDIR"])


@pytest.fixture(scope="session")
def services(workdir: Path) -> Container:
    """The in-process adapters and handlers, as the CLI uses them (migrations applied)."""
    return build_container(get_settings())


@pytest.fixture(scope="session")
def tap(services: Container) -> Iterator[EventTap]:
    validators: list[Callable[[dict[str, Any]], None]] = []
    try:
        from tests.support.asyncapi import validate_event
    except ImportError:  # the AsyncAPI checks arrive with the contract tests
        pass
    else:
        validators.append(validate_event)
    event_tap = EventTap(services.settings.broker_url, validators).start()
    yield event_tap
    event_tap.stop()
    assert not event_tap.invalid, f"invalid events on tenant.events: {event_tap.invalid[:3]}"


@pytest.fixture(scope="session")
def worker(services: Container, workdir: Path) -> Iterator[WorkerGroup]:
    """The saga's workers: one, or ``TEST_WORKERS`` of them under distinct node names, all
    consuming ``provisioner.saga`` (several hosts, as the broker sees them)."""
    group = start_workers(workdir, worker_count(), concurrency=3)
    yield group
    group.stop()


@pytest.fixture
def redis_url(services: Container) -> str:
    """Redis, whatever the session's broker: the one-script publishing is the Redis transport's
    (on RabbitMQ the broker routes)."""
    return services.settings.redis_url


@pytest.fixture
def redis_publisher(redis_url: str) -> Iterator[Publisher]:
    publisher = Publisher(redis_url)
    yield publisher
    publisher.close()
