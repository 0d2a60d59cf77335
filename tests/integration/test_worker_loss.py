"""A worker process killed with SIGKILL mid-step loses no saga and no event."""

from __future__ import annotations

import os
import signal
import time

import pytest
from sqlmodel import Session, col, select

from sagas.messages import CommandType
from service.bootstrap import Container
from service.db.models import OutboxEvent, StepRun, Tenant
from service.faults import FaultMode
from service.handlers import Request
from tests.support.events import EventTap, data_of, new_slug, settled
from tests.support.processes import ServiceProcess

pytestmark = pytest.mark.integration


def step_run(services: Container, slug: str, step: str) -> StepRun | None:
    with Session(services.engine) as session:
        tenant = session.exec(select(Tenant).where(Tenant.slug == slug)).one()
        return session.exec(
            select(StepRun).where(StepRun.tenant_id == tenant.id, StepRun.step == step)
        ).first()


def test_sigkill_mid_step_redelivers_the_step_and_the_saga_ends(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("kill")
    # The step blocks (a hang that spends itself on this one try) so we can kill it mid-step.
    services.faults.add("provision_storage", mode=FaultMode.HANG, tenant=slug, times=1)
    services.handlers.create(Request(CommandType.PROVISION, slug), plan="pro")
    tap.wait_for(
        lambda evs: any(
            e["type"] == "tenant.provisioning.step_started"
            and e["data"]["step"] == "provision_storage"
            for e in evs
        ),
        slug,
    )

    # The child reports a job's start to the pool only just after it begins; give it that
    # moment, so the kill lands mid-step (see the design notes on the window before it).
    time.sleep(1.0)
    # The session's worker is the only one consuming the saga queue now: kill its whole pool.
    pool = worker.children()
    assert pool, "the worker has no pool processes"
    for child in pool:
        os.kill(child.pid, signal.SIGKILL)

    # The message is handed back (reject_on_worker_lost) and a fresh pool process runs it; the
    # spent hang plan no longer matches, so the step now completes.
    events = tap.wait_for(settled, slug, timeout=60)
    assert events[-1]["type"] == "tenant.provisioning.completed", [e["type"] for e in events]
    run = step_run(services, slug, "provision_storage")
    assert run is not None
    assert run.status == "completed"
    assert run.tries == 2  # the killed try and the redelivered one
    assert not services.locks.is_held(slug)

    # No event lost: everything in the outbox was published, and seen once, in order.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with Session(services.engine) as session:
            rows = session.exec(
                select(OutboxEvent).where(OutboxEvent.subject == slug).order_by(col(OutboxEvent.id))
            ).all()
        if all(r.published_at for r in rows) and len(tap.of(slug)) >= len(rows):
            break
        time.sleep(0.1)
    assert [r.event_id for r in rows] == [e["id"] for e in tap.of(slug)]
    assert len(data_of(tap.of(slug), "tenant.provisioning.step_completed")) == 8
    services.faults.clear()
