"""Issue 6: a step's events go out with its next step's task message, in one script on Redis
(service/held_publishes.py), events first; what no message carried goes when the task ends; a
publish that fails keeps them held for its retry; nothing is lost or reordered."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from sagas.messages import EventType
from sagas.steps import STEPS
from service.bootstrap import Container
from service.held_publishes import HELD, send
from service.publisher import Publisher
from service.reliable_redis import TRANSPORT
from tests.integration.test_provisioning import create
from tests.integration.test_publisher_batch import bound_queue, drain, events, ids_of
from tests.support.events import EventTap, new_slug
from tests.support.workers import WorkerGroup

pytestmark = pytest.mark.integration


@pytest.fixture
def holding() -> Iterator[None]:
    HELD.start()
    yield
    HELD.stop()


class TaskQueue:
    """A direct exchange and its queue, as Celery's task messages use, on the service's
    transport; counts the scripts its channel runs."""

    def __init__(self, connection: Connection, *, named: bool = True) -> None:
        name = f"tests.held.{uuid.uuid4().hex[:8]}"
        self.channel = connection.default_channel
        self.exchange = Exchange(name, type="direct")
        self.queue = Queue(name, exchange=self.exchange, routing_key=name).bind(self.channel)
        self.queue.declare()
        # Celery sends its task messages to the nameless exchange, the queue as routing key.
        self.producer = Producer(self.channel, exchange=self.exchange if named else Exchange(""))
        self.scripts: list[tuple[list[object], list[object]]] = []
        run_script = self.channel.run_script

        def counted(source: str, keys: list[object], args: list[object]) -> object:
            self.scripts.append((keys, args))
            return run_script(source, keys, args)

        self.channel.run_script = counted

    def publish(self, payload: dict[str, int], **options: object) -> None:
        self.producer.publish(payload, routing_key=self.queue.name, serializer="json", **options)

    def current(self) -> Queue:
        """The queue on the producer's channel (kombu's retry may have revived it on a new one)."""
        return self.queue.bind(self.producer.channel)

    def received(self) -> list[object]:
        payloads = []
        while (message := self.current().get(no_ack=True)) is not None:
            payloads.append(message.payload)
        return payloads


@contextmanager
def _task_queue(redis_url: str, *, named: bool) -> Iterator[TaskQueue]:
    with Connection(redis_url, transport=TRANSPORT) as connection:
        tasks = TaskQueue(connection, named=named)
        try:
            yield tasks
        finally:
            tasks.current().delete()


@pytest.fixture(params=["named exchange", "nameless exchange"])
def task_queue(redis_url: str, request: pytest.FixtureRequest) -> Iterator[TaskQueue]:
    with _task_queue(redis_url, named=request.param == "named exchange") as tasks:
        yield tasks


@pytest.fixture
def named_task_queue(redis_url: str) -> Iterator[TaskQueue]:
    with _task_queue(redis_url, named=True) as tasks:
        yield tasks


@pytest.fixture
def everything(redis_url: str) -> Iterator[Queue]:
    """A queue bound to every event on tenant.events."""
    with Connection(redis_url) as connection:
        queue = bound_queue(connection, "#")
        try:
            yield queue
        finally:
            queue.delete()


def test_held_events_go_out_with_the_next_task_message_in_one_script(
    redis_publisher: Publisher, task_queue: TaskQueue, holding: None, everything: Queue
) -> None:
    slug = new_slug("held")
    warm, sent = events(slug, 1), events(slug, 2)
    marked: list[str] = []
    # Both channels read their exchange's bindings once (a script of its own each).
    redis_publisher.publish_events(warm)
    task_queue.publish({"n": 0})
    task_queue.scripts.clear()

    redis_publisher.publish_events(
        sent, on_sent=lambda: marked.append("sent"), with_next_message=True
    )
    assert drain(everything, slug) == ids_of(warm)
    assert marked == []

    task_queue.publish({"n": 1})

    assert len(task_queue.scripts) == 1
    _keys, args = task_queue.scripts[0]
    # The events first, then the task message, in the one script.
    bodies = [a for a in args if isinstance(a, str) and a.startswith("{")]
    # (each event once for every queue bound to it: this test's, the session's)
    assert len(bodies) >= 3
    for body in bodies[:-1]:
        assert f'"routing_key": "{EventType.STEP_STARTED.value}"' in body
    assert f'"routing_key": "{task_queue.queue.name}"' in bodies[-1]
    assert drain(everything, slug) == ids_of(sent)
    assert task_queue.received() == [{"n": 0}, {"n": 1}]
    assert marked == ["sent"]
    assert HELD.take() == []


def test_what_no_message_carried_is_sent_when_the_holding_stops(
    redis_publisher: Publisher, everything: Queue
) -> None:
    slug = new_slug("tail")
    sent = events(slug, 2)
    marked: list[str] = []
    HELD.start()
    redis_publisher.publish_events(
        sent, on_sent=lambda: marked.append("sent"), with_next_message=True
    )
    held = HELD.stop()
    assert drain(everything, slug) == []
    send(held)
    assert drain(everything, slug) == ids_of(sent)
    assert marked == ["sent"]
    # Not holding any more: published at once.
    later = events(slug, 1)
    redis_publisher.publish_events(later, with_next_message=True)
    assert drain(everything, slug) == ids_of(later)


def test_a_publish_that_is_not_held_sends_what_is_held_first(
    redis_publisher: Publisher, holding: None, everything: Queue
) -> None:
    slug = new_slug("order")
    first, second = events(slug, 2), events(slug, 1)
    redis_publisher.publish_events(first, with_next_message=True)
    redis_publisher.publish_events(second)
    assert drain(everything, slug) == ids_of(first) + ids_of(second)


def test_a_task_message_whose_connection_was_killed_keeps_the_events_for_its_retry(
    redis_publisher: Publisher, task_queue: TaskQueue, holding: None, everything: Queue
) -> None:
    slug = new_slug("retry")
    sent = events(slug, 2)
    marked: list[str] = []
    task_queue.publish({"n": 0})  # the channel's client exists and knows the tables
    redis_publisher.publish_events(
        sent, on_sent=lambda: marked.append("sent"), with_next_message=True
    )
    with task_queue.channel.conn_or_acquire() as client:
        own_id = client.client_id()
    everything.channel.client.client_kill_filter(_id=own_id)

    task_queue.publish({"n": 1}, retry=True, retry_policy={"max_retries": 3})

    assert drain(everything, slug) == ids_of(sent)
    assert task_queue.received() == [{"n": 0}, {"n": 1}]
    assert marked == ["sent"]


def test_a_task_message_whose_script_failed_carries_the_events_on_kombus_retry(
    redis_publisher: Publisher, task_queue: TaskQueue, holding: None, everything: Queue
) -> None:
    """A publish that fails (after redis-py's own retries) puts what it carried back: kombu's
    retry of the publish, on a revived channel, sends them with the message."""
    slug = new_slug("failed")
    sent = events(slug, 2)
    marked: list[str] = []
    task_queue.publish({"n": 0})
    redis_publisher.publish_events(
        sent, on_sent=lambda: marked.append("sent"), with_next_message=True
    )

    def unreachable(source: str, keys: list[object], args: list[object]) -> object:
        raise redis.ConnectionError("the script's connection broke")

    task_queue.channel.run_script = unreachable
    task_queue.publish({"n": 1}, retry=True, retry_policy={"max_retries": 3})

    assert drain(everything, slug) == ids_of(sent)
    assert task_queue.received() == [{"n": 0}, {"n": 1}]
    assert marked == ["sent"]
    assert HELD.take() == []


def test_batches_of_two_exchanges_are_routed_again_when_either_table_changed(
    redis_url: str, redis_publisher: Publisher, named_task_queue: TaskQueue, holding: None
) -> None:
    """A queue bound to either exchange after its table was read gets the next script's
    message: the script checks both tables and pushes nothing until both are as routed by."""
    slug = new_slug("tables")
    with Connection(redis_url) as connection:
        named_task_queue.publish({"n": 0})
        redis_publisher.publish_events(events(slug, 1))  # both tables read
        late_events = bound_queue(connection, "tenant.provisioning.#")
        late_tasks = Queue(
            f"{named_task_queue.queue.name}.late",
            exchange=named_task_queue.exchange,
            routing_key=named_task_queue.queue.name,
        ).bind(connection.default_channel)
        late_tasks.declare()
        try:
            sent = events(slug, 2)
            redis_publisher.publish_events(sent, with_next_message=True)
            named_task_queue.publish({"n": 1})
            assert drain(late_events, slug) == ids_of(sent)
            late = late_tasks.get(no_ack=True)
            assert late is not None
            assert late.payload == {"n": 1}
            assert named_task_queue.received() == [{"n": 0}, {"n": 1}]
        finally:
            late_events.delete()
            late_tasks.delete()


def test_a_worker_sends_each_steps_events_with_the_next_steps_message(
    services: Container, worker: WorkerGroup, tap: EventTap
) -> None:
    """Through a real worker: on Redis, the message of every step after the first goes out in
    one script with the events of the step before it (its `step_completed`, then the next
    step's `step_started`); on any broker, the events arrive complete and in order."""
    broker = services.settings.broker_url
    on_redis = broker.startswith("redis://")
    commands: list[str] = []
    stop = threading.Event()
    listening = threading.Event()

    def watch() -> None:
        # Raw lines: redis-py's parsing of MONITOR lines fails on some message bodies.
        client = redis.Redis.from_url(broker)
        with client.monitor() as monitor:  # type: ignore[no-untyped-call]
            listening.set()
            while not stop.is_set():
                line = monitor.connection.read_response()
                text = line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line)
                if '"EVALSHA"' in text and "provisioner.step." in text:
                    commands.append(text)

    watcher = threading.Thread(target=watch, daemon=True)
    if on_redis:
        watcher.start()
        assert listening.wait(5)
    slug = new_slug("together")
    try:
        assert create(services, slug).accepted
        received = tap.wait_for_type(slug, "tenant.provisioning.completed")
    finally:
        stop.set()
        if on_redis:
            # One more command wakes the monitor so that it sees `stop`.
            redis.Redis.from_url(broker).ping()
            watcher.join(5)

    order = [
        (e["type"].rsplit(".", 1)[1], e["data"].get("step"))
        for e in received
        if e["type"] != EventType.STARTED.value
    ]
    expected: list[tuple[str, str | None]] = [("step_started", STEPS[0])]
    for step, following in zip(STEPS, [*STEPS[1:], None], strict=True):
        expected.append(("step_completed", step))
        expected.append(("step_started", following) if following else ("completed", None))
    assert order == expected
    if on_redis:
        # The scripts that pushed this saga's messages (the worker's delivery records hold them
        # too, in the unacked hash): the ones that check a binding table.
        mine = [c for c in commands if slug in c and "_kombu.binding." in c]
        carried = {step: [c for c in mine if f"provisioner.step.{step}" in c] for step in STEPS[1:]}
        for step, scripts in carried.items():
            # A pool process's first script may only learn a binding table (it pushes nothing
            # and is run again): the last one pushed.
            assert scripts, step
            assert "tenant.provisioning.step_completed" in scripts[-1], step
            assert "tenant.provisioning.step_started" in scripts[-1], step
            # The events first (their bodies are base64; the routing keys are plain).
            last = scripts[-1]
            assert last.rindex("tenant.provisioning.") < last.index(f"provisioner.step.{step}")
