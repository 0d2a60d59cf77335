"""The Redis transport every consumer here uses (service/reliable_redis.py): no message is lost
between the pop and the unacked hash, whatever dies when.

Each test uses the session's Redis database as a broker and a queue of its own.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection, Consumer, Exchange, Message, Producer, Queue
from redis import Redis

from config.keys import PROCESSING_STALE_S, processing_key
from service.bootstrap import Container
from service.reliable_redis import consumer_connection

pytestmark = pytest.mark.integration

# A consumer that dies after BLMOVE has handed it the message and before it recorded the
# delivery: the moment in which kombu's BRPOP loses a message.
DIE_AFTER_THE_MOVE = """
import os, signal, sys
from kombu import Consumer, Queue
from service.reliable_redis import QoS, consumer_connection

def die(self, message, delivery_tag):
    os.kill(os.getpid(), signal.SIGKILL)

QoS.append = die
broker, queue = sys.argv[1:3]
with consumer_connection(broker, {}) as conn:
    with Consumer(conn.default_channel, queues=[Queue(queue)], accept=["json"]):
        while True:
            conn.drain_events(timeout=5)
"""


@pytest.fixture
def broker(services: Container) -> str:
    return services.settings.redis_url


@pytest.fixture
def queue(broker: str) -> Iterator[str]:
    name = f"reliable-{uuid.uuid4().hex[:8]}"
    yield name
    keys = [name, processing_key(name), f"{processing_key(name)}:unreadable"]
    Redis.from_url(broker).delete(*keys)


def publish(broker: str, queue: str, body: dict[str, object], **properties: object) -> None:
    with Connection(broker) as conn:
        producer = Producer(conn.default_channel)
        producer.publish(
            body, routing_key=queue, declare=[Queue(queue, Exchange(""))], **properties
        )


def consume(broker: str, queue: str, count: int, timeout: float) -> list[Message]:
    """What a live consumer of ours receives (and acknowledges) within ``timeout``."""
    received: list[Message] = []

    def on_message(message: Message) -> None:
        received.append(message)
        message.ack()

    deadline = time.monotonic() + timeout
    with (
        consumer_connection(broker, {"unacked_restore_throttle": 1}) as conn,
        Consumer(
            conn.default_channel, queues=[Queue(queue)], on_message=on_message, accept=["json"]
        ),
    ):
        while len(received) < count and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                continue
    return received


def test_a_consumer_killed_after_the_move_loses_nothing(broker: str, queue: str) -> None:
    publish(broker, queue, {"n": 1})
    died = subprocess.run(
        [sys.executable, "-c", DIE_AFTER_THE_MOVE, broker, queue], timeout=60, check=False
    )
    assert died.returncode == -signal.SIGKILL
    redis = Redis.from_url(broker)
    # BRPOP would have lost it here; it sits in the queue's processing list instead.
    assert redis.llen(queue) == 0
    assert redis.llen(processing_key(queue)) == 1

    # A live consumer of the queue puts it back once it is stale, and gets it.
    received = consume(broker, queue, 1, timeout=PROCESSING_STALE_S * 4)
    assert [m.payload for m in received] == [{"n": 1}]
    assert redis.llen(processing_key(queue)) == 0


def test_a_delivery_is_recorded_as_it_leaves_the_processing_list(broker: str, queue: str) -> None:
    for n in range(20):
        publish(broker, queue, {"n": n})
    received = consume(broker, queue, 20, timeout=30)
    assert sorted(m.payload["n"] for m in received) == list(range(20))
    redis = Redis.from_url(broker)
    assert redis.llen(processing_key(queue)) == 0
    assert redis.llen(queue) == 0


def test_raw_junk_on_the_list_is_kept_aside_and_the_rest_flows(broker: str, queue: str) -> None:
    redis = Redis.from_url(broker)
    redis.lpush(queue, b"\xff not a kombu message")
    publish(broker, queue, {"n": "after the junk"})
    received = consume(broker, queue, 1, timeout=30)
    assert [m.payload for m in received] == [{"n": "after the junk"}]
    assert redis.lrange(f"{processing_key(queue)}:unreadable", 0, -1) == [
        b"\xff not a kombu message"
    ]
    assert redis.llen(processing_key(queue)) == 0


def test_a_message_with_a_priority_is_delivered_too(broker: str, queue: str) -> None:
    # kombu's default priority steps put it on another list than the one BLMOVE reads.
    publish(broker, queue, {"n": "urgent"}, priority=9)
    redis = Redis.from_url(broker)
    assert redis.llen(queue) == 0
    received = consume(broker, queue, 1, timeout=30)
    assert [m.payload for m in received] == [{"n": "urgent"}]
