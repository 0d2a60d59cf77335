"""The Redis transport every consumer here uses (service/reliable_redis.py): no message is lost
between the pop and the unacked hash, whatever dies when.

Each test uses the session's Redis database as a broker and a queue of its own.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from kombu import Connection, Consumer, Exchange, Message, Producer, Queue
from kombu.utils.json import loads as kombu_loads
from redis import Redis

from config.keys import PROCESSING_STALE_S, processing_key
from service import reliable_redis
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


def _drain(conn: Connection, until: Callable[[], bool], timeout: float = 30) -> None:
    """Let ``conn`` deliver until ``until()`` holds or ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            continue


def consume(broker: str, queue: str, count: int, timeout: float) -> list[Message]:
    """What a live consumer of ours receives (and acknowledges) within ``timeout``."""
    received: list[Message] = []

    def on_message(message: Message) -> None:
        received.append(message)
        message.ack()

    with (
        consumer_connection(broker, {"unacked_restore_throttle": 1}) as conn,
        Consumer(
            conn.default_channel, queues=[Queue(queue)], on_message=on_message, accept=["json"]
        ),
    ):
        _drain(conn, lambda: len(received) >= count, timeout)
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
    received = consume(broker, queue, 1, timeout=2)
    redis.lpush(queue, b'{"json": "but not a kombu message"}')
    publish(broker, queue, {"n": "after the junk"})
    received += consume(broker, queue, 1, timeout=30)
    assert [m.payload for m in received] == [{"n": "after the junk"}]
    assert redis.lrange(f"{processing_key(queue)}:unreadable", 0, -1) == [
        b"\xff not a kombu message",
        b'{"json": "but not a kombu message"}',
    ]
    assert redis.llen(processing_key(queue)) == 0


def test_a_message_with_a_priority_is_delivered_too(broker: str, queue: str) -> None:
    # kombu's default priority steps put it on another list than the one BLMOVE reads.
    publish(broker, queue, {"n": "urgent"}, priority=9)
    redis = Redis.from_url(broker)
    assert redis.llen(queue) == 0
    received = consume(broker, queue, 1, timeout=30)
    assert [m.payload for m in received] == [{"n": "urgent"}]


def _receive(conn: Connection, queue: str, count: int, timeout: float = 30) -> list[Message]:
    """Deliveries on ``conn``, left unacknowledged."""
    received: list[Message] = []
    consumer = Consumer(
        conn.default_channel, queues=[Queue(queue)], on_message=received.append, accept=["json"]
    )
    with consumer:
        _drain(conn, lambda: len(received) >= count, timeout)
    assert len(received) == count
    return received


def _recorded(redis: Redis, channel: object, tag: str) -> tuple[bool, bool]:
    qos = channel.qos  # type: ignore[attr-defined]
    return (
        redis.zscore(qos.unacked_index_key, tag) is not None,
        redis.hexists(qos.unacked_key, tag),
    )


def test_a_delivery_stays_in_the_unacked_index_and_hash_until_acknowledged(
    broker: str, queue: str
) -> None:
    publish(broker, queue, {"n": "held"})
    redis = Redis.from_url(broker)
    with consumer_connection(broker, {}) as conn:
        [message] = _receive(conn, queue, 1)
        tag = message.delivery_tag
        assert _recorded(redis, conn.default_channel, tag) == (True, True)
        # kombu's own record: what its restore puts back on the queue.
        record = redis.hget(conn.default_channel.qos.unacked_key, tag)
        assert isinstance(record, bytes)
        raw, _exchange, routing_key = json.loads(record)
        assert raw["properties"]["delivery_tag"] == tag
        assert routing_key == queue
        assert redis.llen(processing_key(queue)) == 0

        message.ack()
        assert _recorded(redis, conn.default_channel, tag) == (False, False)


def test_an_unacknowledged_delivery_goes_back_to_its_queue_from_its_record(
    broker: str, queue: str
) -> None:
    publish(broker, queue, {"n": "again"})
    redis = Redis.from_url(broker)
    with consumer_connection(broker, {}) as conn:
        [first] = _receive(conn, queue, 1)
        tag = first.delivery_tag
        qos = conn.default_channel.qos
        keys = (qos.unacked_index_key, qos.unacked_key)
    # Closing the channel restores what it did not acknowledge, reading the unacked hash.
    assert redis.llen(queue) == 1
    assert redis.zscore(keys[0], tag) is None
    assert not redis.hexists(keys[1], tag)
    received = consume(broker, queue, 1, timeout=30)
    assert [m.payload for m in received] == [{"n": "again"}]


def test_deliveries_go_on_when_the_server_has_forgotten_the_scripts(
    broker: str, queue: str
) -> None:
    # A Redis restarted empty knows no script: EVALSHA fails once and the script is sent again.
    for n in range(2):
        publish(broker, queue, {"n": n})
    redis = Redis.from_url(broker)
    with consumer_connection(broker, {}) as conn:
        [first] = _receive(conn, queue, 1)
        first.ack()
        redis.script_flush()
        [second] = _receive(conn, queue, 1)
        assert _recorded(redis, conn.default_channel, second.delivery_tag) == (True, True)
        redis.script_flush()
        second.ack()
        assert _recorded(redis, conn.default_channel, second.delivery_tag) == (False, False)
    assert sorted(m.payload["n"] for m in (first, second)) == [0, 1]


def test_a_batch_acknowledgement_larger_than_one_script_call_covers_it_all(
    broker: str, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reliable_redis, "ACK_CHUNK", 7)
    for n in range(20):
        publish(broker, queue, {"n": n})
    redis = Redis.from_url(broker)
    with consumer_connection(broker, {}) as conn:
        received = _receive(conn, queue, 20)
        tags = [m.delivery_tag for m in received]
        assert all(_recorded(redis, conn.default_channel, t) == (True, True) for t in tags)
        conn.default_channel.qos.ack_many(tags)
        assert all(_recorded(redis, conn.default_channel, t) == (False, False) for t in tags)
    # Nothing was left to restore on close.
    assert redis.llen(queue) == 0


# --- takes: a backlog leaves the queue in batches (one script a batch, not two trips a message)


def test_a_backlog_is_taken_in_one_batch_in_order_and_recorded(broker: str, queue: str) -> None:
    for n in range(30):
        publish(broker, queue, {"n": n})
    redis = Redis.from_url(broker)
    received: list[Message] = []
    # What the queue holds as the second message is handed over.
    left_at_second: list[int] = []

    def on_message(message: Message) -> None:
        received.append(message)
        if len(received) == 2:
            left_at_second.append(redis.llen(queue))
        message.ack()

    with (
        consumer_connection(broker, {}) as conn,
        Consumer(
            conn.default_channel, queues=[Queue(queue)], on_message=on_message, accept=["json"]
        ),
    ):
        _drain(conn, lambda: len(received) == 30)
    assert [m.payload["n"] for m in received] == list(range(30))
    # The first message came by BLMOVE and its record said 29 were waiting: the next poll took
    # all of them at once, so none was left on the queue when the second was handed over.
    assert left_at_second == [0]
    assert redis.llen(queue) == 0
    assert redis.llen(processing_key(queue)) == 0


def test_taken_deliveries_are_recorded_until_acknowledged_and_restored_on_close(
    broker: str, queue: str
) -> None:
    for n in range(12):
        publish(broker, queue, {"n": n})
    redis = Redis.from_url(broker)
    with consumer_connection(broker, {}) as conn:
        received = _receive(conn, queue, 12)
        channel = conn.default_channel
        assert all(_recorded(redis, channel, m.delivery_tag) == (True, True) for m in received)
        # The take writes kombu's own record, as a delivery by BLMOVE does.
        record = redis.hget(channel.qos.unacked_key, received[5].delivery_tag)
        assert isinstance(record, bytes)
        raw, _exchange, routing_key = json.loads(record)
        assert raw == received[5]._raw
        assert routing_key == queue
        for message in received[:4]:
            message.ack()
        tags = [m.delivery_tag for m in received]
        qos = channel.qos
        keys = (qos.unacked_index_key, qos.unacked_key)
    # The channel closed with eight unacknowledged: each went back to the queue once.
    assert redis.llen(queue) == 8
    assert all(redis.zscore(keys[0], t) is None and not redis.hexists(keys[1], t) for t in tags)
    again = consume(broker, queue, 8, timeout=30)
    assert sorted(m.payload["n"] for m in again) == list(range(4, 12))


def test_a_take_never_exceeds_the_consumers_prefetch(broker: str, queue: str) -> None:
    for n in range(30):
        publish(broker, queue, {"n": n})
    redis = Redis.from_url(broker)
    received: list[Message] = []
    acking = False

    def on_message(message: Message) -> None:
        received.append(message)
        if acking:
            message.ack()

    with (
        consumer_connection(broker, {}) as conn,
        Consumer(
            conn.default_channel,
            queues=[Queue(queue)],
            on_message=on_message,
            accept=["json"],
            prefetch_count=5,
        ),
    ):
        # Nothing is acknowledged: five, and no more, may be in hand.
        _drain(conn, lambda: False, timeout=2)
        assert [m.payload["n"] for m in received] == [0, 1, 2, 3, 4]
        assert redis.llen(queue) == 25
        received[0].ack()
        _drain(conn, lambda: False, timeout=2)
        assert [m.payload["n"] for m in received] == [0, 1, 2, 3, 4, 5]
        assert redis.llen(queue) == 24
        acking = True
        for message in received[1:]:
            message.ack()
        _drain(conn, lambda: len(received) == 30)
    assert [m.payload["n"] for m in received] == list(range(30))
    assert redis.llen(queue) == 0


def test_what_a_raising_consumer_was_not_handed_goes_back_in_order(broker: str, queue: str) -> None:
    for n in range(20):
        publish(broker, queue, {"n": n})
    redis = Redis.from_url(broker)
    acked: list[int] = []

    def on_message(message: Message) -> None:
        if message.payload["n"] == 6:
            raise RuntimeError("the consumer's own failure")
        acked.append(message.payload["n"])
        message.ack()

    with (
        consumer_connection(broker, {}) as conn,
        Consumer(
            conn.default_channel, queues=[Queue(queue)], on_message=on_message, accept=["json"]
        ),
    ):
        with pytest.raises(RuntimeError, match="own failure"):
            _drain(conn, lambda: False)
        # Six were handled; the seventh raised; the take's other messages are back on the
        # queue, in their order, out of the unacked hash.
        assert acked == [0, 1, 2, 3, 4, 5]
        back = [json.loads(item)["body"] for item in redis.lrange(queue, 0, -1)]
        assert len(back) == 13
    # The one that raised was handed over (recorded, unacknowledged): the close restored it.
    rest = consume(broker, queue, 14, timeout=30)
    assert sorted(m.payload["n"] for m in rest) == list(range(6, 20))
    assert [m.payload["n"] for m in rest if m.payload["n"] != 6] == list(range(7, 20))


def test_junk_inside_a_backlog_is_kept_aside_and_the_rest_taken(broker: str, queue: str) -> None:
    redis = Redis.from_url(broker)
    for n in range(3):
        publish(broker, queue, {"n": n})
    redis.lpush(queue, b'{"json": "but not a kombu message"}')
    redis.lpush(queue, b"\xff not json")
    for n in range(3, 6):
        publish(broker, queue, {"n": n})
    received = consume(broker, queue, 6, timeout=30)
    assert [m.payload["n"] for m in received] == list(range(6))
    assert redis.lrange(f"{processing_key(queue)}:unreadable", 0, -1) == [
        b'{"json": "but not a kombu message"}',
        b"\xff not json",
    ]


def test_taken_messages_of_a_consumer_without_acks_leave_no_record(broker: str, queue: str) -> None:
    for n in range(10):
        publish(broker, queue, {"n": n})
    redis = Redis.from_url(broker)
    received: list[Message] = []
    with consumer_connection(broker, {}) as conn:
        channel = conn.default_channel
        with Consumer(
            channel, queues=[Queue(queue)], on_message=received.append, no_ack=True, accept=["json"]
        ):
            _drain(conn, lambda: len(received) == 10)
        tags = [m.delivery_tag for m in received]
        assert all(_recorded(redis, channel, t) == (False, False) for t in tags)
    assert [m.payload["n"] for m in received] == list(range(10))
    # Nothing for a close, or a later visibility timeout, to put back.
    assert redis.llen(queue) == 0


def test_a_taken_message_python_cannot_read_is_kept_aside_without_a_record(
    broker: str, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The take's script reads JSON with Lua's decoder; were Python's to disagree on a message, it
    # is kept aside like any unreadable one, and its record dropped.
    def picky_loads(text: str) -> object:
        if '"poison": true' in text:
            raise ValueError("Python's decoder refuses it")
        return kombu_loads(text)

    monkeypatch.setattr(reliable_redis, "loads", picky_loads)
    for n in ["first", "second", "third", "fourth"]:
        # The body is base64 in the message's JSON; a header is not.
        publish(broker, queue, {"n": n}, headers={"poison": n == "third"})
    redis = Redis.from_url(broker)
    with consumer_connection(broker, {}) as conn:
        received = _receive(conn, queue, 3)
        channel = conn.default_channel
        assert [m.payload["n"] for m in received] == ["first", "second", "fourth"]
        assert all(_recorded(redis, channel, m.delivery_tag) == (True, True) for m in received)
        [kept] = redis.lrange(f"{processing_key(queue)}:unreadable", 0, -1)
        assert _recorded(redis, channel, json.loads(kept)["properties"]["delivery_tag"]) == (
            False,
            False,
        )
        for message in received:
            message.ack()
    # Nothing was left to restore on close.
    assert redis.llen(queue) == 0


def test_take_next_makes_the_next_poll_take_what_gathered(broker: str, queue: str) -> None:
    # The audit consumer lets a batch window's events gather on the queue, then takes them in one
    # poll (service/audit.py); without take_next, a poll after an emptied queue blocks on BLMOVE
    # and hands over one message.
    publish(broker, queue, {"n": 0})
    redis = Redis.from_url(broker)
    received: list[Message] = []
    with (
        consumer_connection(broker, {}) as conn,
        Consumer(
            conn.default_channel, queues=[Queue(queue)], on_message=received.append, accept=["json"]
        ),
    ):
        _drain(conn, lambda: len(received) == 1)
        channel = conn.default_channel
        for n in range(1, 8):
            publish(broker, queue, {"n": n})
        assert channel.take_next()
        assert not channel.take_next()  # already a take: nothing to change
        conn.drain_events(timeout=5)
        assert [m.payload["n"] for m in received] == list(range(8))
        assert redis.llen(queue) == 0
        # The take came back short (the queue is empty): the next poll blocks on BLMOVE again.
        publish(broker, queue, {"n": 8})
        publish(broker, queue, {"n": 9})
        conn.drain_events(timeout=5)
        assert [m.payload["n"] for m in received] == list(range(9))
        assert redis.llen(queue) == 1
        for message in received:
            message.ack()
