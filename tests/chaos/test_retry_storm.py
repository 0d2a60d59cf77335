"""1,000 retry commands for one failed tenant, from 4 publisher processes at once, to 2
listeners: exactly one attempt starts; every other command is answered with its own
rejection."""

from __future__ import annotations

import json
import multiprocessing
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from sagas.messages import CommandType
from service.bootstrap import Container
from service.db.models import OutboxEvent, ProcessedCommand
from service.faults import FaultMode
from service.handlers import Request
from tests.support.events import EventTap, data_of, new_slug
from tests.support.outcome import outcomes
from tests.support.processes import ServiceProcess, start_listeners, stop_together
from tests.support.stack import wait_until
from tests.support.storm import publish_retries
from tests.support.workers import WorkerGroup

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

STORM = 1000
PUBLISHERS = 4


@pytest.fixture
def listeners(services: Container, workdir: Path) -> Iterator[list[ServiceProcess]]:
    started = start_listeners(workdir, [f"storm1k-listener-{i}" for i in range(2)])
    yield started
    stop_together(started)


def answers(services: Container, slug: str) -> list[dict[str, object]]:
    with Session(services.engine) as session:
        rows = session.exec(
            select(OutboxEvent.body)
            .where(OutboxEvent.subject == slug)
            .where(OutboxEvent.type == "tenant.command.rejected")
        ).all()
    return [json.loads(body)["data"] for body in rows]


def test_a_storm_of_1000_retries_starts_exactly_one_attempt(
    services: Container, worker: WorkerGroup, tap: EventTap, listeners: list[ServiceProcess]
) -> None:
    slug = new_slug("storm1k")
    services.faults.add("provision_storage", mode=FaultMode.ERROR, tenant=slug, times=3)
    assert services.handlers.create(Request(CommandType.PROVISION, slug), plan="pro").accepted
    tap.wait_for_type(slug, "tenant.provisioning.failed", timeout=60)

    ids = [str(uuid.uuid4()) for _ in range(STORM)]
    shares = [ids[i::PUBLISHERS] for i in range(PUBLISHERS)]
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(PUBLISHERS) as pool:
        sent = pool.starmap(
            publish_retries, [(services.settings.broker_url, slug, share) for share in shares]
        )
    assert sum(sent) == STORM

    wait_until(lambda: len(answers(services, slug)) >= STORM - 1, 120, "999 answers", poll=0.5)
    rejections = answers(services, slug)
    assert len(rejections) == STORM - 1
    answered = Counter(str(r["command_id"]) for r in rejections)
    assert all(n == 1 for n in answered.values()), "a command was answered twice"
    assert set(answered) < set(ids)
    assert {r["reason"] for r in rejections} <= {"locked", "not_failed"}
    with Session(services.engine) as session:
        recorded = session.exec(
            select(ProcessedCommand).where(col(ProcessedCommand.command_id).in_(ids))
        ).all()
    assert Counter(r.outcome for r in recorded) == {"accepted": 1, "rejected": STORM - 1}
    (accepted,) = [r.command_id for r in recorded if r.outcome == "accepted"]
    assert accepted not in answered

    tap.wait_for_type(slug, "tenant.provisioning.completed", timeout=60)
    final = outcomes(services.engine, [slug])[slug]
    assert final.attempts == [(1, "failed"), (2, "succeeded")]
    started = data_of(tap.of(slug), "tenant.provisioning.started")
    assert [d["trigger"] for d in started] == ["create", "retry"]
    # every answer reached the bus too
    wait_until(
        lambda: len(data_of(tap.of(slug), "tenant.command.rejected")) >= STORM - 1,
        30,
        "the rejections on the bus",
    )
    on_bus = {d["command_id"] for d in data_of(tap.of(slug), "tenant.command.rejected")}
    assert on_bus == set(answered)
    assert all("listener.handled" in listener.log_text() for listener in listeners)
    print(
        {
            "test": "retry_storm",
            "commands": STORM,
            "attempts_started": 1,
            "rejected": len(rejections),
            "reasons": dict(Counter(str(r["reason"]) for r in rejections)),
        }
    )
