"""10,000 hostile command messages through the real listeners, with valid commands among them.

The hostile ones are generated with Hypothesis strategies (``tests/support/hostile.py``): not
JSON, not an object, broken CloudEvents, unknown types, bad ``data`` (wrong types, huge strings,
unicode, NUL, missing fields), deep nesting, content types the listener refuses. They are
published raw with kombu as fast as one connection goes. The listener must stay up, keep every
one (dead letter) and answer it ``malformed``, and serve the valid commands in between: among
them, provision commands whose slug or plan tries path traversal or SQL, which the saga's
validate step refuses before anything touches the filesystem or a query string.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kombu import Connection, Producer
from sqlalchemy import Engine, func, inspect
from sqlmodel import Session, col, select

from service.bootstrap import Container
from service.db.migrate import current_revision
from service.db.models import Attempt, DeadLetter, OutboxEvent, ProcessedCommand, Tenant
from service.publisher import COMMANDS, COMMANDS_QUEUE_DECL
from tests.support.commands import command_body
from tests.support.events import new_slug
from tests.support.hostile import Message, Payload, hostile_messages, serialise
from tests.support.processes import ServiceProcess, start_listeners, stop_together
from tests.support.stack import wait_until
from tests.support.workers import WorkerGroup

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

HOSTILE = 10_000
BATCH = 50
VALID_EVERY = 200


class Firehose:
    """Publishes raw messages to ``tenant.commands`` on one connection, a valid command from
    ``valid`` before every ``VALID_EVERY``-th hostile one."""

    def __init__(self, producer: Producer, valid: list[tuple[str, str, str]]) -> None:
        self._producer = producer
        self._valid = iter(valid)
        self.hostile = 0

    def _publish(self, body: bytes, routing_key: str, content_type: str | None) -> None:
        self._producer.publish(
            body,
            exchange=COMMANDS,
            routing_key=routing_key,
            content_type=content_type,
            content_encoding="utf-8",
            delivery_mode=2,
        )

    def _send_valid(self, item: tuple[str, str, str]) -> None:
        kind, _, body = item
        self._publish(body.encode(), kind, "application/cloudevents+json")

    def send_hostile(self, payload: Payload, content_type: str | None) -> None:
        if self.hostile % VALID_EVERY == 0 and (item := next(self._valid, None)) is not None:
            self._send_valid(item)
        self._publish(serialise(self.hostile, payload), "tenant.hostile", content_type)
        self.hostile += 1

    def finish(self) -> None:
        for item in self._valid:
            self._send_valid(item)


def publish_hostile(count: int, firehose: Firehose) -> None:
    """``count`` hostile messages from the strategies, reproducibly (derandomised), published
    batch by batch as Hypothesis makes them, so the listeners work while it generates."""

    @settings(
        max_examples=count // BATCH + 20,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(hostile_messages, min_size=BATCH, max_size=BATCH))
    def publish(batch: list[Message]) -> None:
        for payload, content_type in batch[: count - firehose.hostile]:
            firehose.send_hostile(payload, content_type)

    publish()
    assert firehose.hostile == count, f"hypothesis produced {firehose.hostile} messages"
    firehose.finish()


def traversal_commands(canary: str) -> list[tuple[str, str]]:
    """(slug, plan) pairs a careless provider would turn into paths or SQL."""
    return [
        (f"../../../../../../tmp/{canary}-1", "pro"),
        (f"../../{canary}-2", "free"),
        (f"/tmp/{canary}-3", "pro"),
        (f"{canary}-4/../../../..", "pro"),
        (f"a'; DROP TABLE tenants; -- {canary}-5", "pro"),
        (f'{canary}-6"; DELETE FROM outbox; --', "free"),
        (f"ok-{canary[:8]}-7", f"../../../../tmp/{canary}-7"),
        (f"ok-{canary[:8]}-8", "pro'; DROP TABLE audit_events; --"),
        (f"ok-{canary[:8]}-9", "%2e%2e%2f%2e%2e%2fetc"),
        (f"ünï-{canary[:8]}-10", "enterprise"),
    ]


@pytest.fixture
def listeners(services: Container, workdir: Path) -> Iterator[list[ServiceProcess]]:
    """Two listener processes on the queue: competing consumers, and twice the pace."""
    started = start_listeners(workdir, [f"hostile-listener-{n}" for n in (1, 2)])
    yield started
    stop_together(started)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def valid_command(kind: str, slug: str, **data: Any) -> tuple[str, str, str]:
    """(type, command id, body) of a well-formed command."""
    command_id, body = command_body(kind, slug, **data)
    return kind, command_id, body


def max_id(engine: Engine, model: type[DeadLetter] | type[OutboxEvent]) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.max(model.id))).one() or 0)


def test_10000_hostile_commands_are_kept_and_answered_and_valid_ones_served(
    services: Container, worker: WorkerGroup, listeners: list[ServiceProcess], workdir: Path
) -> None:
    engine = services.engine
    data_dir = services.settings.data_dir
    canary = f"canary-{uuid.uuid4().hex[:10]}"
    outside = [workdir, workdir.parent, Path.cwd(), Path("/tmp")]
    before_outside = {root: {p.name for p in root.iterdir()} for root in outside}
    before_tables = set(inspect(engine).get_table_names())
    revision = current_revision(engine)
    dead_from, outbox_from = max_id(engine, DeadLetter) + 1, max_id(engine, OutboxEvent) + 1

    valid_slugs = [new_slug("hv") for _ in range(10)]
    traversals = traversal_commands(canary)
    valid = [valid_command("tenant.provision_requested", slug, plan="free") for slug in valid_slugs]
    valid += [valid_command("tenant.provision_requested", s, plan=p) for s, p in traversals]
    valid += [
        valid_command("tenant.reset_requested", f"hv-nobody-{n}")
        for n in range(HOSTILE // VALID_EVERY - len(valid))
    ]

    with Connection(services.settings.broker_url) as connection:
        producer = Producer(connection.default_channel)
        for entity in (COMMANDS, COMMANDS_QUEUE_DECL):
            entity.bind(producer.channel).declare()
        publish_hostile(HOSTILE, Firehose(producer, valid))

    def dead_letters() -> int:
        with Session(engine) as session:
            return int(
                session.exec(
                    select(func.count())
                    .select_from(DeadLetter)
                    .where(col(DeadLetter.id) >= dead_from)
                    .where(DeadLetter.source == "listener")
                ).one()
            )

    valid_ids = [command_id for _, command_id, _ in valid]

    def valid_served() -> bool:
        with Session(engine) as session:
            served = session.exec(
                select(func.count())
                .select_from(ProcessedCommand)
                .where(col(ProcessedCommand.command_id).in_(valid_ids))
            ).one()
        return int(served) == len(valid_ids)

    wait_until(lambda: dead_letters() >= HOSTILE and valid_served(), 150, "every message", poll=1.0)
    for listener in listeners:
        assert listener.process is not None
        assert listener.process.poll() is None, f"{listener.name} died"
        assert "listener.handled" in listener.log_text()
    assert dead_letters() == HOSTILE

    # Each hostile message answered once, `malformed`; the valid ones answered as the rules say.
    with Session(engine) as session:
        answers = [
            json.loads(body)["data"]
            for body in session.exec(
                select(OutboxEvent.body)
                .where(col(OutboxEvent.id) >= outbox_from)
                .where(OutboxEvent.type == "tenant.command.rejected")
            ).all()
        ]
    malformed = [a for a in answers if a["reason"] == "malformed"]
    assert len(malformed) == HOSTILE
    others = {a["command_id"]: a["reason"] for a in answers if a["reason"] != "malformed"}
    resets = [command_id for kind, command_id, _ in valid if kind == "tenant.reset_requested"]
    assert all(others.get(c) == "unknown_tenant" for c in resets)

    # The provisions: the good ones complete; the traversal and SQL ones fail validation, for
    # good, having made nothing.
    every = valid_slugs + [slug for slug, _ in traversals]

    def all_settled() -> bool:
        with Session(engine) as session:
            states = session.exec(select(Tenant.state).where(col(Tenant.slug).in_(every))).all()
        return len(states) == len(every) and all(s in ("active", "failed") for s in states)

    wait_until(all_settled, 90, "the provisions to settle", poll=1.0)
    with Session(engine) as session:
        for slug in valid_slugs:
            assert session.exec(select(Tenant).where(Tenant.slug == slug)).one().state == "active"
        for slug, _ in traversals:
            tenant = session.exec(select(Tenant).where(Tenant.slug == slug)).one()
            attempt = session.exec(select(Attempt).where(Attempt.tenant_id == tenant.id)).one()
            assert (tenant.state, attempt.failed_step, attempt.retryable) == (
                "failed",
                "validate",
                False,
            ), slug

    # Nothing outside the data dir changed; nothing inside it is named after a hostile slug.
    for root, names in before_outside.items():
        assert not {n for n in {p.name for p in root.iterdir()} - names if canary in n}, root
    for base in (data_dir, data_dir.parent, Path("/tmp"), Path("/")):
        assert not list(base.glob(f"{canary}*")), base
    assert not [p for p in tree(data_dir) if canary in p or ".." in Path(p).parts]
    # The database is intact: same tables, same schema revision, rows still there.
    assert set(inspect(engine).get_table_names()) == before_tables
    assert current_revision(engine) == revision
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(Tenant)).one() >= len(every)
    print(
        {
            "test": "hostile_input",
            "hostile": HOSTILE,
            "dead_lettered": dead_letters(),
            "answered_malformed": len(malformed),
            "valid": len(valid),
            "traversal_and_sql_refused": len(traversals),
        }
    )
