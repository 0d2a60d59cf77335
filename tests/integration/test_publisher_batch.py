"""Issue 6: the events of one transaction are published as one batch (one pipeline of pushes,
one reading of the exchange's bindings on Redis), in order, to every bound queue; a queue bound
after a batch gets the next one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection, Queue

from sagas.messages import EventType
from service.bootstrap import Container
from service.events import build_event, read_event
from service.publisher import EVENTS, Publisher
from tests.support.events import new_slug

pytestmark = pytest.mark.integration


@pytest.fixture
def publisher(services: Container) -> Iterator[Publisher]:
    publisher = Publisher(services.settings.broker_url)
    yield publisher
    publisher.close()


def bound_queue(connection: Connection, routing_key: str) -> Queue:
    queue = Queue(
        f"tests.batch.{uuid.uuid4().hex[:8]}",
        exchange=EVENTS,
        routing_key=routing_key,
        durable=False,
    ).bind(connection.default_channel)
    EVENTS.bind(connection.default_channel).declare()
    queue.declare()
    return queue


def drain(queue: Queue, subject: str) -> list[str]:
    """The ids of this test's events in the queue, in order (other tests' events may pass)."""
    ids: list[str] = []
    while (message := queue.get(no_ack=True)) is not None:
        event = read_event(message.body)
        if event.get("subject") == subject:
            ids.append(event["id"])
    return ids


def events(slug: str, count: int) -> list[tuple[str, str]]:
    """Valid step_started events (the session's tap checks every event on the exchange)."""
    out = []
    for _ in range(count):
        data = {
            "tenant_id": str(uuid.uuid4()),
            "slug": slug,
            "state": "provisioning",
            "attempt_number": 1,
            "step": "validate",
        }
        _event_id, body = build_event(EventType.STEP_STARTED, slug, data)
        out.append((EventType.STEP_STARTED.value, body))
    return out


def ids_of(batch: list[tuple[str, str]]) -> list[str]:
    return [read_event(body)["id"] for _, body in batch]


def test_a_batch_reaches_every_bound_queue_in_order_and_a_new_binding_gets_the_next(
    services: Container, publisher: Publisher
) -> None:
    slug = new_slug("batch")
    first, second = events(slug, 5), events(slug, 3)
    with Connection(services.settings.broker_url) as connection:
        everything = bound_queue(connection, "tenant.provisioning.*")
        publisher.publish_events(first)
        late = bound_queue(connection, EventType.STEP_STARTED.value)
        publisher.publish_events(second)
        try:
            assert drain(everything, slug) == ids_of(first) + ids_of(second)
            assert drain(late, slug) == ids_of(second)
        finally:
            everything.delete()
            late.delete()
