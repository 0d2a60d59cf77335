"""The listener, the relay and the audit consumer, each SIGKILLed mid-stream and restarted.

A stream of commands (some start sagas, most are answered with a rejection) runs through the
listener while it is killed; a backlog of thousands of outbox rows runs through the relay while it
is killed between publishing a batch and marking it; the audit consumer is killed while it stores
them. Afterwards: every command was answered exactly once, the outbox is all published, and the
audit store holds exactly the outbox's events, each once (the relay republished some: the store
dedups on the CloudEvent id).

It runs on both brokers. On Redis, kombu's own transport could lose the one message Redis handed
to a consumer as it was killed (BRPOP; two CI runs saw it once each); every consumer here takes
messages through service/reliable_redis.py instead, which cannot.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func
from sqlmodel import Session, col, select

from sagas.messages import CommandType, EventType
from service.bootstrap import Container
from service.db.engine import unit_of_work
from service.db.models import AuditEvent, OutboxEvent, ProcessedCommand
from service.outbox import PendingEvents
from service.publisher import Publisher
from tests.support.commands import send
from tests.support.events import EventTap, new_slug
from tests.support.outcome import duplicates, settled
from tests.support.stack import Stack, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

PROVISIONS = 6
CHEAP_COMMANDS = 300
BACKLOG = 4000
BACKLOG_SUBJECTS = [f"backlog-{i}" for i in range(8)]


def count(services: Container, query: Any) -> int:
    with Session(services.engine) as session:
        return int(session.exec(query).one())


def processed(services: Container, ids: list[str]) -> int:
    return count(
        services,
        select(func.count())
        .select_from(ProcessedCommand)
        .where(col(ProcessedCommand.command_id).in_(ids)),
    )


def outbox_since(services: Container, first_id: int) -> list[OutboxEvent]:
    with Session(services.engine) as session:
        return list(session.exec(select(OutboxEvent).where(col(OutboxEvent.id) >= first_id)))


def published_backlog(services: Container, first_id: int) -> int:
    return count(
        services,
        select(func.count())
        .select_from(OutboxEvent)
        .where(col(OutboxEvent.id) >= first_id)
        .where(col(OutboxEvent.subject).in_(BACKLOG_SUBJECTS))
        .where(col(OutboxEvent.published_at).is_not(None)),
    )


def stored_backlog(services: Container, first_id: int) -> int:
    """This run's backlog events in the audit store (the other broker's run wrote its own)."""
    backlog = (
        select(OutboxEvent.event_id)
        .where(col(OutboxEvent.id) >= first_id)
        .where(col(OutboxEvent.subject).in_(BACKLOG_SUBJECTS))
    )
    return count(
        services,
        select(func.count())
        .select_from(AuditEvent)
        .where(col(AuditEvent.event_id).in_(backlog.scalar_subquery())),
    )


def write_backlog(services: Container) -> int:
    """Rows a crash left unpublished (old enough for the relay loop): first id of them."""
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    with unit_of_work(services.engine) as session:
        pending = PendingEvents()
        for n in range(BACKLOG):
            subject = BACKLOG_SUBJECTS[n % len(BACKLOG_SUBJECTS)]
            row = pending.add(
                session,
                EventType.COMMAND_REJECTED,
                subject,
                {
                    "tenant_id": None,
                    "slug": subject,
                    "state": None,
                    "command_type": CommandType.RESET.value,
                    "command_id": str(uuid.uuid4()),
                    "reason": "unknown_tenant",
                    "message": f"backlog event {n}",
                },
            )
            row.created_at = long_ago
        session.flush()
        return min(row.id for row in pending.rows if row.id is not None)


def test_listener_relay_and_audit_consumer_killed_mid_stream(
    services: Container, workdir: Path, broker: tuple[str, str]
) -> None:
    kind, broker_url = broker
    stack = Stack(workdir, {"PROVISIONER_BROKER_URL": broker_url}, tag=f"consumer-kills-{kind}")
    tap = EventTap(broker_url).start()
    with Session(services.engine) as session:
        first_id = (session.exec(select(func.max(OutboxEvent.id))).one() or 0) + 1
    kills: list[str] = []
    publisher = Publisher(broker_url)
    try:
        stack.worker("w1", concurrency=2, wait=False)
        stack.start("listener", ["listen"], wait=False)
        stack.start("relay", ["relay"], wait=False)
        stack.start("audit", ["consume"], wait=False)
        stack.wait_ready("w1", "listener", "relay", "audit")

        # 1. The listener, killed a third of the way through a stream of commands.
        slugs = [new_slug("ck") for _ in range(PROVISIONS)]
        commands: list[str] = [
            send(publisher, "tenant.provision_requested", slug, plan="free") for slug in slugs
        ]
        for n in range(CHEAP_COMMANDS):
            commands.append(send(publisher, "tenant.reset_requested", f"nobody-{n}"))
        wait_until(lambda: processed(services, commands) >= len(commands) // 3, 60, "a third")
        assert processed(services, commands) < len(commands), "the stream ended before the kill"
        stack.kill("listener")
        kills.append("listener")
        stack.start("listener", ["listen"])

        # 2. The relay, killed between publishing a batch of a backlog and marking it.
        stack.kill("relay")
        backlog_from = write_backlog(services)
        stack.start("relay", ["relay"], wait=False)
        wait_until(lambda: published_backlog(services, backlog_from) > 0, 60, "a batch")
        assert published_backlog(services, backlog_from) < BACKLOG
        stack.kill("relay")
        kills.append("relay")
        stack.start("relay", ["relay"])

        # 3. The audit consumer, killed while it stores the flood.
        wait_until(
            lambda: stored_backlog(services, backlog_from) > 0, 60, "the audit store to fill"
        )
        assert stored_backlog(services, backlog_from) < BACKLOG
        stack.kill("audit")
        kills.append("audit")
        stack.start("audit", ["consume"])

        # Everything drains.
        wait_until(lambda: processed(services, commands) == len(commands), 90, "every command")
        wait_until(lambda: settled(services.engine, slugs) == set(slugs), 90, "the sagas")

        def drained() -> bool:
            rows = outbox_since(services, first_id)
            if any(r.published_at is None for r in rows):
                return False
            with Session(services.engine) as session:
                stored = session.exec(
                    select(func.count())
                    .select_from(AuditEvent)
                    .where(col(AuditEvent.event_id).in_([r.event_id for r in rows]))
                ).one()
            return int(stored) == len(rows)

        wait_until(drained, 90, "the outbox published and audited", poll=1.0)

        rows = outbox_since(services, first_id)
        ids = [r.event_id for r in rows]
        with Session(services.engine) as session:
            audited = list(
                session.exec(select(AuditEvent.event_id).where(col(AuditEvent.event_id).in_(ids)))
            )
        assert not duplicates(audited)
        assert sorted(audited) == sorted(ids)

        # Every command answered exactly once: a start for each provision, one rejection each.
        answers = Counter(
            json.loads(r.body)["data"].get("command_id")
            for r in rows
            if r.type == "tenant.command.rejected" and r.subject not in BACKLOG_SUBJECTS
        )
        assert all(answers[c] == 1 for c in commands[PROVISIONS:]), "an answer is missing or twice"
        started = [r for r in rows if r.type == "tenant.provisioning.started"]
        assert sorted(str(r.subject) for r in started) == sorted(slugs)
        bus = [e["id"] for e in tap.events if e["id"] in set(ids)]
        republished = sum(n - 1 for n in duplicates(bus).values())
        print(
            {
                "test": "consumer_kills",
                "kills": kills,
                "commands": len(commands),
                "outbox_events": len(ids),
                "republished_on_bus": republished,
                "audit_duplicates": len(duplicates(audited)),
            }
        )
    finally:
        publisher.close()
        tap.stop()
        stack.stop_all()
