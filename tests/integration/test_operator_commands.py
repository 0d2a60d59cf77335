"""Issue 4: retry, reset and decommission, with their rules, on real Redis and real workers."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
from sqlmodel import Session, col, select

from sagas.messages import CommandType
from sagas.steps import STEPS
from service.bootstrap import Container
from service.db.models import Attempt, OutboxEvent, StepRun, Tenant
from service.faults import FaultMode
from service.handlers import Outcome, Request
from tests.support.api import wait_until
from tests.support.events import EventTap, data_of, new_slug, settled
from tests.support.processes import ServiceProcess, logged

pytestmark = pytest.mark.integration

FAILED = "tenant.provisioning.failed"
COMPLETED = "tenant.provisioning.completed"
STARTED = "tenant.provisioning.started"


def create(services: Container, slug: str, plan: str = "pro") -> Outcome:
    return services.handlers.create(Request(CommandType.PROVISION, slug), plan=plan)


def retry(services: Container, slug: str, force: bool = False) -> Outcome:
    return services.handlers.retry(
        Request(CommandType.RETRY, slug, requested_by="ops"), force=force
    )


def reset(services: Container, slug: str) -> Outcome:
    return services.handlers.reset(Request(CommandType.RESET, slug, requested_by="ops"))


def decommission(services: Container, slug: str) -> Outcome:
    return services.handlers.decommission(Request(CommandType.DECOMMISSION, slug))


def wait_attempt_settled(
    tap: EventTap, slug: str, number: int, timeout: float = 30
) -> dict[str, Any]:
    events = tap.wait_for(
        lambda evs: any(
            e["type"] in (FAILED, COMPLETED) and e["data"]["attempt_number"] == number for e in evs
        ),
        slug,
        timeout,
    )
    return next(
        e
        for e in events
        if e["type"] in (FAILED, COMPLETED) and e["data"]["attempt_number"] == number
    )


def fail_first_attempt(services: Container, tap: EventTap, slug: str, step: str) -> dict[str, Any]:
    services.faults.add(step, mode=FaultMode.ERROR, tenant=slug)
    create(services, slug)
    failed = wait_attempt_settled(tap, slug, 1)
    assert failed["type"] == FAILED
    return failed


def clear_faults_of(services: Container, slug: str) -> None:
    for plan in services.faults.list():
        if plan.tenant == slug:
            services.faults.clear(plan.id)


def tenant_of(services: Container, slug: str) -> Tenant:
    with Session(services.engine) as session:
        return session.exec(
            select(Tenant).where(Tenant.slug == slug).order_by(col(Tenant.created_at).desc())
        ).first()  # type: ignore[return-value]


def test_retry_resumes_at_the_failed_step_reusing_what_exists(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("resume")
    fail_first_attempt(services, tap, slug, "issue_certificate")
    clear_faults_of(services, slug)

    outcome = retry(services, slug)

    assert outcome.accepted, outcome.message
    assert outcome.attempt_number == 2
    done = wait_attempt_settled(tap, slug, 2)
    assert done["type"] == COMPLETED
    events = [e for e in tap.of(slug) if e["data"].get("attempt_number") == 2]
    started = data_of(events, STARTED)[0]
    assert started["trigger"] == "retry"
    assert started["resumed_from"] == "issue_certificate"
    assert started["reused_steps"] == [
        "validate",
        "reserve_slot",
        "provision_storage",
        "register_workflows",
    ]
    assert started["requested_by"] == "ops"
    skipped = data_of(events, "tenant.provisioning.step_skipped")
    assert [(d["step"], d["reused_from_attempt"]) for d in skipped] == [
        (s, 1) for s in started["reused_steps"]
    ]
    ran = [d["step"] for d in data_of(events, "tenant.provisioning.step_completed")]
    assert ran == list(STEPS[4:])


def test_a_deleted_early_step_makes_the_retry_start_there(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("deleted")
    fail_first_attempt(services, tap, slug, "configure_admin_console")
    clear_faults_of(services, slug)
    # an operator deleted the tenant's storage directory by hand
    tenant = tenant_of(services, slug)
    shutil.rmtree(services.settings.data_dir / "storage" / tenant.id)

    outcome = retry(services, slug)

    assert outcome.details["resumed_from"] == "provision_storage"
    assert outcome.details["reused_steps"] == ["validate", "reserve_slot"]
    assert wait_attempt_settled(tap, slug, 2)["type"] == COMPLETED
    assert (services.settings.data_dir / "storage" / tenant.id).is_dir()


def test_retry_rules_refuse_with_the_contract_reasons(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    unknown = retry(services, new_slug("nobody"))
    assert (unknown.accepted, unknown.reason) == (False, "unknown_tenant")

    active = new_slug("active")
    create(services, active)
    wait_attempt_settled(tap, active, 1)
    refused = retry(services, active)
    assert refused.reason == "not_failed"
    assert "only a failed tenant" in refused.message

    invalid = "Invalid_" + new_slug("slug")
    create(services, invalid)
    wait_attempt_settled(tap, invalid, 1)
    refused = retry(services, invalid)
    assert refused.reason == "not_retryable"
    assert "decommission" in refused.message
    assert "recreate" in refused.message

    # every refusal is answered on the bus, with the command's id
    rejection = tap.wait_for_type(invalid, "tenant.command.rejected")[-1]["data"]
    assert rejection["command_type"] == "tenant.retry_requested"
    assert rejection["command_id"] == refused.command_id
    assert rejection["reason"] == "not_retryable"


def test_two_retries_then_the_cap_then_force_and_repeated_failure(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("cap")
    first = fail_first_attempt(services, tap, slug, "register_workflows")["data"]
    assert (first["retries_left"], first["repeated_failure"]) == (2, False)

    assert retry(services, slug).accepted
    second = wait_attempt_settled(tap, slug, 2)["data"]
    assert (second["retries_left"], second["repeated_failure"]) == (1, True)

    assert retry(services, slug).accepted
    third = wait_attempt_settled(tap, slug, 3)["data"]
    assert (third["retries_left"], third["repeated_failure"]) == (0, True)

    capped = retry(services, slug)
    assert capped.reason == "retry_cap_reached"
    assert "escalate" in capped.message
    assert "--force" in capped.message

    clear_faults_of(services, slug)
    forced = retry(services, slug, force=True)
    assert forced.accepted
    assert forced.attempt_number == 4
    assert wait_attempt_settled(tap, slug, 4)["type"] == COMPLETED


def test_a_different_failure_is_not_flagged_repeated(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("differ")
    fail_first_attempt(services, tap, slug, "register_workflows")
    clear_faults_of(services, slug)
    services.faults.add("check_readiness", mode=FaultMode.FATAL, tenant=slug, times=1)
    retry(services, slug)
    second = wait_attempt_settled(tap, slug, 2)["data"]
    assert second["failed_activity"] == "check_readiness"
    assert second["repeated_failure"] is False


def test_hang_locked_reset_fences_the_old_attempt_then_retry_succeeds(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("stuck")
    services.faults.add("register_workflows", mode=FaultMode.HANG, tenant=slug)
    create(services, slug)
    tap.wait_for(
        lambda evs: any(
            e["type"] == "tenant.provisioning.step_started"
            and e["data"]["step"] == "register_workflows"
            for e in evs
        ),
        slug,
    )

    refused = retry(services, slug)
    assert refused.reason == "locked"
    assert "reset first" in refused.message
    assert decommission(services, slug).reason == "locked"

    outcome = reset(services, slug)
    assert outcome.accepted
    assert outcome.details == {"reset_attempt": 1, "lock_released": True}
    [event] = data_of(
        tap.wait_for_type(slug, "tenant.provisioning.reset"), "tenant.provisioning.reset"
    )
    assert event["reset_attempt"] == 1
    assert event["lock_released"] is True
    assert event["requested_by"] == "ops"
    assert event["state"] == "failed"
    # the step is still hung; its next renewal finds the lock gone and does not take it back
    wait_until(
        lambda: logged(worker.log_text(), "lock.lost_while_hanging", slug),
        30,
        "the hung step's renewal after the reset",
    )
    assert not services.locks.is_held(slug)

    with Session(services.engine) as session:
        outbox_before = len(
            session.exec(select(OutboxEvent).where(OutboxEvent.subject == slug)).all()
        )
    tenant = tenant_of(services, slug)
    # wake the hung step: it must write nothing, emit nothing and stop its chain
    clear_faults_of(services, slug)
    wait_until(
        lambda: logged(worker.log_text(), "step.fenced", slug),
        30,
        "the old step to wake and find itself fenced",
    )
    with Session(services.engine) as session:
        outbox_after = len(
            session.exec(select(OutboxEvent).where(OutboxEvent.subject == slug)).all()
        )
        first = session.exec(
            select(Attempt).where(Attempt.tenant_id == tenant.id, Attempt.number == 1)
        ).one()
        runs = session.exec(select(StepRun).where(StepRun.attempt_id == first.id)).all()
    assert outbox_after == outbox_before
    assert first.state == "reset"
    assert {r.step: r.status for r in runs}["register_workflows"] == "running"
    assert "configure_admin_console" not in {r.step for r in runs}
    assert not (services.settings.data_dir / "registry" / f"{tenant.id}.json").exists()
    assert tenant_of(services, slug).state == "failed"
    assert not services.locks.is_held(slug)

    again = retry(services, slug)
    assert again.accepted, again.message
    assert again.details["resumed_from"] == "register_workflows"
    assert wait_attempt_settled(tap, slug, 2)["type"] == COMPLETED


def test_reset_without_a_running_attempt_is_harmless(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("calm")
    create(services, slug)
    wait_attempt_settled(tap, slug, 1)
    epoch = tenant_of(services, slug).epoch

    outcome = reset(services, slug)

    assert outcome.accepted
    assert "nothing to reset" in outcome.message
    assert tenant_of(services, slug).state == "active"
    assert tenant_of(services, slug).epoch == epoch
    assert reset(services, new_slug("ghost")).reason == "unknown_tenant"


def test_decommission_after_a_certificate_failure_compensates_what_ran_in_reverse(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("decom")
    fail_first_attempt(services, tap, slug, "issue_certificate")
    clear_faults_of(services, slug)
    tenant = tenant_of(services, slug)
    data_dir = services.settings.data_dir
    assert (data_dir / "storage" / tenant.id).is_dir()

    outcome = decommission(services, slug)

    assert outcome.accepted
    events = tap.wait_for_type(slug, "tenant.decommission.completed")
    compensated = [d["step"] for d in data_of(events, "tenant.decommission.step_completed")]
    assert compensated == ["register_workflows", "provision_storage", "reserve_slot"]
    assert data_of(events, "tenant.decommission.started")[0]["steps"] == compensated
    assert not (data_dir / "storage" / tenant.id).exists()
    assert not (data_dir / "registry" / f"{tenant.id}.json").exists()
    assert not (data_dir / "certs" / tenant.id).exists()
    gone = tenant_of(services, slug)
    assert gone.state == "decommissioned"
    assert not services.locks.is_held(slug)

    assert decommission(services, slug).reason == "already_decommissioned"
    assert retry(services, slug).reason == "already_decommissioned"

    # the slug is free again, for a new tenant
    again = create(services, slug)
    assert again.accepted
    assert again.tenant_id != tenant.id
    assert wait_attempt_settled(tap, slug, 1, timeout=30)["data"]["tenant_id"] in (
        tenant.id,
        again.tenant_id,
    )
    tap.wait_for(
        lambda evs: any(
            e["type"] == COMPLETED and e["data"]["tenant_id"] == again.tenant_id for e in evs
        ),
        slug,
    )


def test_a_failing_compensation_leaves_decommissioning_and_a_rerun_resumes(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("stubborn")
    create(services, slug)
    wait_attempt_settled(tap, slug, 1)
    services.faults.add("provision_storage", mode=FaultMode.ERROR, tenant=slug)

    decommission(services, slug)
    failed = data_of(
        tap.wait_for_type(slug, "tenant.decommission.failed"), "tenant.decommission.failed"
    )[0]
    assert failed["step"] == "provision_storage"
    assert tenant_of(services, slug).state == "decommissioning"
    done_first = [d["step"] for d in data_of(tap.of(slug), "tenant.decommission.step_completed")]
    assert done_first == [
        "activate",
        "configure_admin_console",
        "issue_certificate",
        "register_workflows",
    ]

    clear_faults_of(services, slug)
    outcome = decommission(services, slug)
    assert outcome.accepted, outcome.message
    assert outcome.details["steps"] == ["provision_storage", "reserve_slot"]
    tap.wait_for_type(slug, "tenant.decommission.completed")
    assert tenant_of(services, slug).state == "decommissioned"


def test_decommission_of_an_active_tenant_frees_the_slot(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("retire")
    create(services, slug)
    wait_attempt_settled(tap, slug, 1)
    decommission(services, slug)
    events = tap.wait_for_type(slug, "tenant.decommission.completed")
    assert [d["step"] for d in data_of(events, "tenant.decommission.step_completed")] == [
        "activate",
        "configure_admin_console",
        "issue_certificate",
        "register_workflows",
        "provision_storage",
        "reserve_slot",
    ]
    assert events[-1]["data"]["state"] == "decommissioned"
    assert settled(events)
