"""Issue 6: the events of one transaction are published as one batch (on Redis, one script that
checks the publisher's copy of the exchange's bindings and pushes them all), in order, to every
bound queue; a queue bound after a batch gets the next one, a queue deleted does not."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress

import pytest
from kombu import Connection, Exchange, Producer, Queue

from config.keys import CLOUDEVENTS_CONTENT_TYPE
from sagas.messages import EventType
from service.bootstrap import Container
from service.events import build_event, read_event
from service.publisher import EVENTS, Publisher
from service.reliable_redis import TRANSPORT
from service.routed_publish import NotRoutedHere, Outgoing, RoutedPublish
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


def test_a_queue_deleted_between_batches_gets_nothing_more(
    redis_url: str, redis_publisher: Publisher
) -> None:
    # The publisher routes by its copy of the binding table: the script must see it is stale.
    # (Deleting a queue removes its bindings; kombu's unbind on Redis leaves the table as is.)
    slug = new_slug("deleted")
    first, second = events(slug, 2), events(slug, 2)
    with Connection(redis_url) as connection:
        leaving = bound_queue(connection, "tenant.provisioning.*")
        staying = bound_queue(connection, "#")
        client = connection.default_channel.client
        try:
            redis_publisher.publish_events(first)
            assert drain(leaving, slug) == ids_of(first)
            leaving.delete()
            redis_publisher.publish_events(second)
            assert client.exists(leaving.name) == 0
            assert drain(staying, slug) == ids_of(first) + ids_of(second)
        finally:
            staying.delete()


def test_a_batch_is_one_script_once_the_bindings_are_known(
    redis_publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    slug = new_slug("trips")
    redis_publisher.publish_events(events(slug, 2))  # reads the table (a second script run)
    channel = redis_publisher._producer().channel
    runs: list[str] = []
    run_script = channel.run_script

    def counted(source: str, keys: list[object], args: list[object]) -> object:
        runs.append(source)
        return run_script(source, keys, args)

    monkeypatch.setattr(channel, "run_script", counted)
    for _ in range(3):
        redis_publisher.publish_events(events(slug, 2))
    assert len(runs) == 3


def test_a_message_is_the_one_kombu_would_have_sent(
    redis_url: str, redis_publisher: Publisher
) -> None:
    """Byte for byte as kombu's Producer.publish writes it, but for its delivery tag."""
    slug = new_slug("format")
    ((routing_key, body),) = events(slug, 1)
    with Connection(redis_url) as connection:
        queue = bound_queue(connection, routing_key)
        client = connection.default_channel.client
        try:
            redis_publisher.publish_events([(routing_key, body)])
            Producer(connection.default_channel).publish(
                body.encode("utf-8"),
                exchange=EVENTS,
                routing_key=routing_key,
                content_type=CLOUDEVENTS_CONTENT_TYPE,
                content_encoding="utf-8",
                delivery_mode=2,
            )
            ours, kombus = (json.loads(raw) for raw in client.lrange(queue.name, 0, -1))
        finally:
            queue.delete()
    for message in (ours, kombus):
        assert message["properties"].pop("delivery_tag")
    assert ours == kombus


def publish_across(
    redis_url: str, publisher: Publisher, name: str, disturb: Callable[[Connection], None]
) -> tuple[list[str], list[str]]:
    """Publish a batch, ``disturb`` the publisher's Redis, publish another: the ids received by
    a queue bound to everything, and the ids sent."""
    slug = new_slug(name)
    first, second = events(slug, 2), events(slug, 3)
    with Connection(redis_url) as connection:
        queue = bound_queue(connection, "#")
        try:
            publisher.publish_events(first)
            disturb(connection)
            publisher.publish_events(second)
            return drain(queue, slug), ids_of(first) + ids_of(second)
        finally:
            queue.delete()


def test_a_publish_after_the_server_forgot_its_scripts_is_delivered(
    redis_url: str, redis_publisher: Publisher
) -> None:
    # A Redis restarted empty knows no script: EVALSHA fails once and the script is sent again.
    def forget_scripts(connection: Connection) -> None:
        connection.default_channel.client.script_flush()

    received, sent = publish_across(redis_url, redis_publisher, "noscript", forget_scripts)
    assert received == sent


def test_a_publish_whose_connection_was_killed_loses_nothing(
    redis_url: str, redis_publisher: Publisher
) -> None:
    def kill_publishers_connection(connection: Connection) -> None:
        with redis_publisher._producer().channel.conn_or_acquire() as client:
            own_id = client.client_id()
        connection.default_channel.client.client_kill_filter(_id=own_id)

    received, sent = publish_across(
        redis_url, redis_publisher, "killed", kill_publishers_connection
    )
    # At least once, in order: a resend after an uncertain failure may repeat some.
    assert list(dict.fromkeys(received)) == sent


def test_a_fanout_exchange_is_left_to_kombu(redis_url: str) -> None:
    with Connection(redis_url, transport=TRANSPORT) as connection:
        channel = connection.default_channel
        fanout = Exchange(f"tests.fanout.{uuid.uuid4().hex[:8]}", type="fanout")
        fanout.bind(channel).declare()
        routed = RoutedPublish(channel)
        with pytest.raises(NotRoutedHere, match="fanout"):
            routed.publish(fanout.name, [Outgoing("any", b"{}", "application/json")])


def test_the_transport_sends_a_task_message_in_one_script(redis_url: str) -> None:
    """Celery's messages too (a direct exchange, kombu's Producer) are routed and pushed in one
    round trip on the service's transport, and arrive as sent."""
    name = f"tests.direct.{uuid.uuid4().hex[:8]}"
    exchange = Exchange(name, type="direct")
    with Connection(redis_url, transport=TRANSPORT) as connection:
        channel = connection.default_channel
        queue = Queue(name, exchange=exchange, routing_key=name).bind(channel)
        queue.declare()
        producer = Producer(channel, exchange=exchange)
        try:
            producer.publish({"n": 0}, routing_key=name, serializer="json")
            runs: list[str] = []
            run_script = channel.run_script

            def counted(source: str, keys: list[object], args: list[object]) -> object:
                runs.append(source)
                return run_script(source, keys, args)

            channel.run_script = counted
            producer.publish({"n": 1}, routing_key=name, serializer="json")
            del channel.run_script
            assert len(runs) == 1
            received = [queue.get(no_ack=True), queue.get(no_ack=True)]
            assert [message.payload for message in received if message] == [{"n": 0}, {"n": 1}]
        finally:
            queue.delete()


def test_a_fanout_message_on_the_transport_goes_through_kombu(redis_url: str) -> None:
    """Celery's events and broadcasts use fanout exchanges: left to kombu's pub/sub."""
    exchange = Exchange(f"tests.fanout.{uuid.uuid4().hex[:8]}", type="fanout")
    received: list[object] = []
    url = redis_url
    with (
        Connection(url, transport=TRANSPORT) as listening,
        Connection(url, transport=TRANSPORT) as sending,
    ):
        queue = Queue(f"{exchange.name}.q", exchange=exchange, auto_delete=True)
        with listening.Consumer(queue, callbacks=[lambda body, message: received.append(body)]):
            # kombu's fanout on Redis is pub/sub: subscribed before the message is sent.
            with suppress(TimeoutError, OSError):
                listening.drain_events(timeout=0.2)
            Producer(sending.default_channel, exchange=exchange).publish(
                {"hello": "fanout"}, serializer="json"
            )
            listening.drain_events(timeout=5)
    assert received == [{"hello": "fanout"}]
