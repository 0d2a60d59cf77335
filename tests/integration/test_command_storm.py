"""50 different retry commands for one failed tenant, at once, to two listener processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select

from sagas.messages import CommandType
from service.bootstrap import Container
from service.db.models import Attempt, Tenant
from service.faults import FaultMode
from service.handlers import Request
from service.publisher import Publisher
from tests.support.commands import command_body
from tests.support.events import EventTap, data_of, new_slug
from tests.support.processes import ServiceProcess, start_listeners, stop_together

pytestmark = pytest.mark.integration

STORM = 50


@pytest.fixture
def two_listeners(services: Container, workdir: Path) -> Iterator[list[ServiceProcess]]:
    listeners = start_listeners(workdir, [f"storm-listener-{i}" for i in range(2)])
    yield listeners
    stop_together(listeners)


def test_a_retry_storm_starts_exactly_one_attempt(
    services: Container,
    worker: ServiceProcess,
    tap: EventTap,
    two_listeners: list[ServiceProcess],
) -> None:
    slug = new_slug("storm")
    services.faults.add("provision_storage", mode=FaultMode.ERROR, tenant=slug, times=3)
    services.handlers.create(Request(CommandType.PROVISION, slug), plan="pro")
    tap.wait_for_type(slug, "tenant.provisioning.failed")

    publisher = Publisher(services.settings.broker_url)
    bodies = [command_body("tenant.retry_requested", slug) for _ in range(STORM)]
    for _, body in bodies:
        publisher.publish_command("tenant.retry_requested", body)
    publisher.close()

    # every command is answered: one by the attempt it started, the others by a rejection
    events = tap.wait_for(
        lambda evs: len(data_of(evs, "tenant.command.rejected")) >= STORM - 1, slug, timeout=60
    )
    rejections = data_of(events, "tenant.command.rejected")
    assert len(rejections) == STORM - 1
    assert {r["reason"] for r in rejections} <= {"locked", "not_failed"}
    answered = {r["command_id"] for r in rejections}
    ids = {command_id for command_id, _ in bodies}
    assert len(answered) == STORM - 1
    assert answered < ids
    retries = [d for d in data_of(events, "tenant.provisioning.started") if d["trigger"] == "retry"]
    assert len(retries) == 1
    with Session(services.engine) as session:
        tenant = session.exec(select(Tenant).where(Tenant.slug == slug)).one()
        attempts = session.exec(select(Attempt).where(Attempt.tenant_id == tenant.id)).all()
    assert sorted(a.number for a in attempts) == [1, 2]
    # both listeners took part
    assert all("listener.handled" in listener.log_text() for listener in two_listeners)
