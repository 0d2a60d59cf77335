"""Issue 3: the saga end to end on real Redis, a real Celery worker and a real database."""

from __future__ import annotations

import threading
import time

import pytest
from sqlmodel import Session, col, select

from sagas.messages import CommandType
from sagas.steps import STEPS
from service.bootstrap import Container
from service.db.models import Attempt, OutboxEvent, StepRun, Tenant
from service.faults import FaultMode
from service.handlers import Outcome, Request
from tests.support.events import EventTap, data_of, new_slug, settled
from tests.support.processes import ServiceProcess

pytestmark = pytest.mark.integration

STEP_COMPLETED = "tenant.provisioning.step_completed"
FAILED = "tenant.provisioning.failed"


def create(services: Container, slug: str, plan: str = "pro", **kw: str) -> Outcome:
    return services.handlers.create(Request(CommandType.PROVISION, slug, **kw), plan=plan)


def tenant_row(services: Container, slug: str) -> Tenant:
    with Session(services.engine) as session:
        tenant = session.exec(select(Tenant).where(Tenant.slug == slug)).one()
        return tenant


def test_happy_path_runs_eight_steps_in_order(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("happy")
    outcome = create(services, slug, requested_by="test-suite")
    assert outcome.accepted

    events = tap.wait_for_type(slug, "tenant.provisioning.completed")

    types = [e["type"] for e in events]
    assert types[0] == "tenant.provisioning.started"
    completed = data_of(events, STEP_COMPLETED)
    assert [d["step"] for d in completed] == list(STEPS)
    started = data_of(events, "tenant.provisioning.started")[0]
    assert started["trigger"] == "create"
    assert started["resumed_from"] == "validate"
    assert started["reused_steps"] == []
    assert started["requested_by"] == "test-suite"
    # every step announces itself before it completes
    for step in STEPS:
        started_at = types.index("tenant.provisioning.step_started")
        assert started_at >= 0
        i_started = next(
            i
            for i, e in enumerate(events)
            if e["type"] == "tenant.provisioning.step_started" and e["data"]["step"] == step
        )
        i_done = next(
            i
            for i, e in enumerate(events)
            if e["type"] == STEP_COMPLETED and e["data"]["step"] == step
        )
        assert i_started < i_done
    done = data_of(events, "tenant.provisioning.completed")[0]
    assert done["admin_console_url"] == f"http://127.0.0.1:8080/console/{slug}"
    assert done["state"] == "active"
    assert done["attempt_number"] == 1
    assert isinstance(done["duration_ms"], int)
    # the outputs name what each step made, and those things exist
    outputs = {d["step"]: d["output"] for d in completed}
    data_dir = services.settings.data_dir
    assert (data_dir / outputs["provision_storage"]["path"]).is_dir()
    assert (data_dir / outputs["issue_certificate"]["cert_path"]).is_file()
    for event in events:
        assert event["specversion"] == "1.0"
        assert event["subject"] == slug
        assert event["data"]["slug"] == slug
        assert event["data"]["tenant_id"] == outcome.tenant_id

    assert tenant_row(services, slug).state == "active"
    assert not services.locks.is_held(slug)


def test_transient_fault_for_two_tries_retries_then_succeeds(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("flaky")
    services.faults.add("register_workflows", mode=FaultMode.ERROR, tenant=slug, times=2)
    create(services, slug)

    events = tap.wait_for(settled, slug)

    retrying = data_of(events, "tenant.provisioning.step_retrying")
    assert [(d["step"], d["try"]) for d in retrying] == [
        ("register_workflows", 1),
        ("register_workflows", 2),
    ]
    assert all(d["retry_in_s"] > 0 and "TransientUpstreamError" in d["error"] for d in retrying)
    # the chain went on after the retried link: every later step ran, once
    assert [d["step"] for d in data_of(events, STEP_COMPLETED)] == list(STEPS)
    assert events[-1]["type"] == "tenant.provisioning.completed"
    with Session(services.engine) as session:
        run = session.exec(
            select(StepRun).where(
                StepRun.tenant_id == tenant_row(services, slug).id,
                StepRun.step == "register_workflows",
            )
        ).one()
        assert run.tries == 3


def test_permanent_error_fails_the_attempt_once(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("broken")
    services.faults.add("issue_certificate", mode=FaultMode.ERROR, tenant=slug)
    try:
        create(services, slug)
        events = tap.wait_for_type(slug, FAILED)
        # give a duplicate errback (Celery 4232/6441) time to show itself
        tap.wait_for(lambda evs: len(evs) >= len(events), slug, timeout=2)
    finally:
        services.faults.clear()

    failed = data_of(tap.of(slug), FAILED)
    assert len(failed) == 1
    [data] = failed
    assert data["failed_activity"] == "issue_certificate"
    assert data["retryable"] is True
    assert data["repeated_failure"] is False
    assert data["retries_left"] == 2
    assert data["state"] == "failed"
    assert data["details"]["error_type"] == "TransientUpstreamError"
    assert data["details"]["tries"] == 3
    assert "injected fault" in data["details"]["message"]
    assert len(data_of(tap.of(slug), "tenant.provisioning.step_retrying")) == 2
    # nothing after the failed step ran
    assert "configure_admin_console" not in [
        d["step"] for d in data_of(tap.of(slug), STEP_COMPLETED)
    ]
    tenant = tenant_row(services, slug)
    assert tenant.state == "failed"
    assert not services.locks.is_held(slug)
    with Session(services.engine) as session:
        attempt = session.exec(select(Attempt).where(Attempt.tenant_id == tenant.id)).one()
        assert attempt.state == "failed"
        assert attempt.failed_step == "issue_certificate"


def test_fatal_fault_is_not_retryable(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("fatal")
    services.faults.add("provision_storage", mode=FaultMode.FATAL, tenant=slug, times=1)
    create(services, slug)

    events = tap.wait_for_type(slug, FAILED)

    [data] = data_of(events, FAILED)
    assert data["failed_activity"] == "provision_storage"
    assert data["retryable"] is False
    assert data["details"]["error_type"] == "FatalUpstreamError"
    assert data["details"]["tries"] == 1
    assert data_of(events, "tenant.provisioning.step_retrying") == []
    # A retry is refused, and the refusal says what failed (not a validation failure).
    refused = services.handlers.retry(Request(CommandType.RETRY, slug), force=True)
    assert (refused.accepted, refused.reason) == (False, "not_retryable")
    assert "failed at provision_storage" in refused.message
    assert "validation" not in refused.message


@pytest.mark.parametrize(
    ("slug", "plan"),
    [
        ("Bad_Slug", "pro"),
        ("../../etc/passwd", "pro"),
        ("x'; DROP TABLE tenants;--", "pro"),
        ("valid-slug-{}", "platinum"),
    ],
)
def test_validation_failure_is_not_retryable(
    services: Container,
    worker: ServiceProcess,
    tap: EventTap,
    slug: str,
    plan: str,
) -> None:
    slug = slug.format(new_slug("v"))
    create(services, slug, plan=plan)

    events = tap.wait_for_type(slug, FAILED)

    [data] = data_of(events, FAILED)
    assert data["failed_activity"] == "validate"
    assert data["retryable"] is False
    assert data["details"]["error_type"] == "ValidationFailure"
    assert data["details"]["tries"] == 1
    # a bad slug never reached the filesystem
    data_dir = services.settings.data_dir
    assert not any(slug in str(path) for path in data_dir.rglob("*"))


def test_two_concurrent_creates_of_one_slug_make_one_tenant(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("race")
    outcomes: list[Outcome] = []
    barrier = threading.Barrier(2)

    def go() -> None:
        barrier.wait()
        outcomes.append(create(services, slug))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(o.accepted for o in outcomes) == [False, True]
    [rejected] = [o for o in outcomes if not o.accepted]
    assert rejected.reason == "slug_taken"
    events = tap.wait_for(settled, slug)
    [rejection] = data_of(events, "tenant.command.rejected")
    assert rejection["reason"] == "slug_taken"
    assert rejection["command_type"] == "tenant.provision_requested"
    assert rejection["command_id"] == rejected.command_id
    with Session(services.engine) as session:
        assert len(session.exec(select(Tenant).where(Tenant.slug == slug)).all()) == 1


def test_the_same_command_id_acts_once(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("idem")
    request = Request(CommandType.PROVISION, slug, command_id=f"cmd-{slug}")
    first = services.handlers.create(request, plan="free")
    second = services.handlers.create(request, plan="free")

    assert first.accepted
    assert second.duplicate
    events = tap.wait_for(settled, slug)
    assert [e["type"] for e in events].count("tenant.provisioning.started") == 1
    assert not data_of(events, "tenant.command.rejected")


def test_every_outbox_row_is_published_and_seen(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("outbox")
    create(services, slug)
    events = tap.wait_for(settled, slug)

    # published, then marked: the mark may land a moment after the event does
    deadline = time.monotonic() + 10
    while True:
        with Session(services.engine) as session:
            rows = session.exec(
                select(OutboxEvent).where(OutboxEvent.subject == slug).order_by(col(OutboxEvent.id))
            ).all()
        if all(r.published_at is not None for r in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [r.event_id for r in rows] == [e["id"] for e in events]
    assert all(r.published_at is not None for r in rows)
