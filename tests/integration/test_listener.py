"""Commands in: the listener on provisioner.commands, its idempotency and its rejections."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select

from service.bootstrap import Container
from service.db.models import DeadLetter, ProcessedCommand
from service.publisher import Publisher
from tests.support.commands import send
from tests.support.events import EventTap, data_of, new_slug, settled
from tests.support.processes import ServiceProcess, start_listener

pytestmark = pytest.mark.integration

PROVISION = "tenant.provision_requested"


@pytest.fixture(scope="module")
def listener(services: Container, workdir: Path) -> Iterator[ServiceProcess]:
    process = start_listener(workdir)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def publisher(services: Container) -> Iterator[Publisher]:
    pub = Publisher(services.settings.broker_url)
    yield pub
    pub.close()


def test_a_provision_command_on_the_bus_provisions_the_tenant(
    services: Container,
    worker: ServiceProcess,
    listener: ServiceProcess,
    tap: EventTap,
    publisher: Publisher,
) -> None:
    slug = new_slug("bus")
    command_id = send(publisher, PROVISION, slug, plan="enterprise", admin_email="a@b.example")

    events = tap.wait_for_type(slug, "tenant.provisioning.completed")

    assert events[0]["type"] == "tenant.provisioning.started"
    assert events[0]["data"]["requested_by"] == "platform-tests"
    with Session(services.engine) as session:
        processed = session.get(ProcessedCommand, command_id)
        assert processed is not None
        assert processed.outcome == "accepted"


def test_plain_json_content_type_is_accepted(
    services: Container,
    worker: ServiceProcess,
    listener: ServiceProcess,
    tap: EventTap,
    publisher: Publisher,
) -> None:
    slug = new_slug("plainjson")
    send(publisher, PROVISION, slug, content_type="application/json", plan="free")
    tap.wait_for_type(slug, "tenant.provisioning.completed")


def test_the_same_command_id_delivered_twice_acts_once(
    services: Container,
    worker: ServiceProcess,
    listener: ServiceProcess,
    tap: EventTap,
    publisher: Publisher,
) -> None:
    slug = new_slug("twice")
    command_id = send(publisher, PROVISION, slug, plan="pro")
    send(publisher, PROVISION, slug, command_id=command_id, plan="pro")
    # a different id for the same slug is answered slug_taken, which also proves both
    # earlier deliveries were handled before it
    send(publisher, PROVISION, slug, plan="pro")

    events = tap.wait_for_type(slug, "tenant.command.rejected")
    tap.wait_for(settled, slug)

    assert [e["type"] for e in tap.of(slug)].count("tenant.provisioning.started") == 1
    [rejected] = data_of(events, "tenant.command.rejected")
    assert rejected["reason"] == "slug_taken"
    assert rejected["command_id"] != command_id


@pytest.mark.parametrize(
    ("body", "content_type", "why"),
    [
        (b"{not json", "application/cloudevents+json", "not valid JSON"),
        (b"[1, 2, 3]", "application/json", "not a JSON object"),
        (
            json.dumps({"id": "x", "type": PROVISION, "data": {"slug": "s"}}).encode(),
            "application/cloudevents+json",
            "not a CloudEvent",
        ),
        (
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": "m-{slug}",
                    "source": "t",
                    "type": "tenant.explode",
                    "data": {"slug": "{slug}"},
                }
            ).encode(),
            "application/cloudevents+json",
            "unknown command type",
        ),
        (
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": "m2-{slug}",
                    "source": "t",
                    "type": PROVISION,
                    "data": {"plan": "pro"},
                }
            ).encode(),
            "application/cloudevents+json",
            "slug",
        ),
        (
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": "m3-{slug}",
                    "source": "t",
                    "type": PROVISION,
                    "data": {"slug": "{slug}", "plan": "pro"},
                }
            ).encode(),
            "text/plain",
            "content type",
        ),
        (b"\xff\xfe\x00binary", "application/octet-stream", "content type"),
    ],
)
def test_a_malformed_command_is_kept_answered_and_the_listener_goes_on(
    services: Container,
    worker: ServiceProcess,
    listener: ServiceProcess,
    tap: EventTap,
    publisher: Publisher,
    body: bytes,
    content_type: str,
    why: str,
) -> None:
    marker = new_slug("bad")
    raw = body.replace(b"{slug}", marker.encode())
    producer = publisher._producer()
    producer.publish(
        raw,
        exchange="tenant.commands",
        routing_key="tenant.garbage",
        content_type=content_type,
        content_encoding="binary",
    )

    def rejections() -> list[dict[str, object]]:
        return [
            e["data"]
            for e in tap.events
            if e["type"] == "tenant.command.rejected"
            and e["data"]["reason"] == "malformed"
            and why.lower() in e["data"]["message"].lower()
            and (marker in json.dumps(e["data"]) or b"{slug}" not in body)
        ]

    def kept() -> bool:
        with Session(services.engine) as session:
            rows = session.exec(select(DeadLetter).where(DeadLetter.source == "listener")).all()
        return any(_decoded(row) == raw for row in rows)

    _wait(kept)  # kept exactly as sent...
    _wait(lambda: bool(rejections()))  # ...and answered
    assert listener.process is not None
    assert listener.process.poll() is None

    # and it still serves valid commands
    slug = new_slug("after")
    send(publisher, PROVISION, slug, plan="free")
    tap.wait_for_type(slug, "tenant.provisioning.started")


def _decoded(row: DeadLetter) -> bytes:
    import base64

    return base64.b64decode(row.body) if row.body_encoding == "base64" else row.body.encode()


def _wait(predicate: object, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_a_malformed_command_redelivered_after_a_crash_is_not_answered_twice(
    services: Container,
    worker: ServiceProcess,
    listener: ServiceProcess,
    tap: EventTap,
    publisher: Publisher,
) -> None:
    marker = new_slug("redeliv")
    raw = json.dumps({"specversion": "1.0", "data": {"slug": marker}, "oops": True}).encode()
    producer = publisher._producer()

    def publish(**headers: object) -> None:
        producer.publish(
            raw,
            exchange="tenant.commands",
            routing_key="tenant.garbage",
            content_type="application/json",
            content_encoding="binary",
            headers=headers,
        )

    def answers() -> int:
        return sum(
            1
            for e in tap.events
            if e["type"] == "tenant.command.rejected" and marker in json.dumps(e["data"])
        )

    def kept() -> int:
        with Session(services.engine) as session:
            rows = session.exec(select(DeadLetter).where(DeadLetter.source == "listener")).all()
        return sum(_decoded(row) == raw for row in rows)

    publish()
    _wait(lambda: answers() == 1 and kept() == 1)
    # What the broker hands back when the listener died after its commit, before its ack: the
    # same bytes, marked redelivered (RabbitMQ's flag; kombu's Redis restore sets the header).
    publish(redelivered=True)
    # The listener reads its queue in order: once a later command is answered, so was that one.
    after = new_slug("redeliv-after")
    send(publisher, PROVISION, after, plan="free")
    tap.wait_for_type(after, "tenant.provisioning.started")
    assert answers() == 1
    assert kept() == 1
    # The same bytes sent again, not redelivered, are a new message: kept and answered.
    publish()
    _wait(lambda: answers() == 2 and kept() == 2)
