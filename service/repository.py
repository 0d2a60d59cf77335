"""Queries the handlers and the saga runner share; each takes the caller's session."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from sagas.planning import Made
from sagas.rules import FailureFacts, TenantFacts
from sagas.states import StepStatus, TenantState
from service.db.models import Attempt, Compensation, ProcessedCommand, StepRun, Tenant


def tenant_by_slug(session: Session, slug: str, *, for_update: bool = False) -> Tenant | None:
    """The live tenant of a slug, else its most recent decommissioned one."""
    query = select(Tenant).where(Tenant.live_slug == slug)
    if for_update:
        query = query.with_for_update()
    live = session.exec(query).first()
    if live is not None:
        return live
    return session.exec(
        select(Tenant).where(Tenant.slug == slug).order_by(col(Tenant.created_at).desc()).limit(1)
    ).first()


def lock_tenant(session: Session, tenant_id: str) -> Tenant:
    """Re-read a tenant holding its row lock (PostgreSQL); SQLite's BEGIN IMMEDIATE already
    serialises writers."""
    tenant = session.exec(select(Tenant).where(Tenant.id == tenant_id).with_for_update()).one()
    return tenant


def attempts_of(session: Session, tenant_id: str) -> list[Attempt]:
    return list(
        session.exec(
            select(Attempt).where(Attempt.tenant_id == tenant_id).order_by(col(Attempt.number))
        ).all()
    )


def last_attempt(session: Session, tenant_id: str) -> Attempt | None:
    return session.exec(
        select(Attempt)
        .where(Attempt.tenant_id == tenant_id)
        .order_by(col(Attempt.number).desc())
        .limit(1)
    ).first()


def attempt_count(session: Session, tenant_id: str) -> int:
    return int(
        session.exec(
            select(func.count()).select_from(Attempt).where(Attempt.tenant_id == tenant_id)
        ).one()
    )


def step_run(session: Session, attempt_id: str, step: str) -> StepRun | None:
    return session.exec(
        select(StepRun).where(StepRun.attempt_id == attempt_id, StepRun.step == step)
    ).first()


def step_runs_of(session: Session, attempt_id: str) -> list[StepRun]:
    return list(
        session.exec(
            select(StepRun).where(StepRun.attempt_id == attempt_id).order_by(col(StepRun.id))
        ).all()
    )


def made_by_earlier_attempts(session: Session, tenant_id: str) -> dict[str, Made]:
    """Per step, what the latest attempt that completed (or reused) it has on record."""
    rows = session.exec(
        select(StepRun, Attempt.number)
        .join(Attempt, col(Attempt.id) == col(StepRun.attempt_id))
        .where(StepRun.tenant_id == tenant_id)
        .where(col(StepRun.status).in_([StepStatus.COMPLETED, StepStatus.SKIPPED]))
        .order_by(col(Attempt.number))
    ).all()
    made: dict[str, Made] = {}
    for run, number in rows:
        origin = run.reused_from_attempt if run.status == StepStatus.SKIPPED else number
        made[run.step] = Made(output=dict(run.output), attempt_number=origin or number)
    return made


def latest_outputs(session: Session, tenant_id: str) -> dict[str, dict[str, Any]]:
    return {
        step: dict(m.output) for step, m in made_by_earlier_attempts(session, tenant_id).items()
    }


def compensation(session: Session, tenant_id: str, step: str) -> Compensation | None:
    return session.exec(
        select(Compensation).where(Compensation.tenant_id == tenant_id, Compensation.step == step)
    ).first()


def compensated_steps(session: Session, tenant_id: str) -> set[str]:
    rows = session.exec(
        select(Compensation.step).where(
            Compensation.tenant_id == tenant_id, Compensation.status == StepStatus.COMPLETED
        )
    ).all()
    return set(rows)


def is_processed(session: Session, command_id: str) -> bool:
    return session.get(ProcessedCommand, command_id) is not None


def failure_of(attempt: Attempt | None) -> FailureFacts | None:
    if attempt is None or attempt.failed_step is None or attempt.error_type is None:
        return None
    return FailureFacts(step=attempt.failed_step, error_type=attempt.error_type)


def tenant_facts(session: Session, tenant: Tenant | None, *, lock_held: bool) -> TenantFacts | None:
    if tenant is None:
        return None
    # The last attempt and how many there are, in one query (a command's path, before it
    # takes the write lock): the count is a window over the tenant's attempts.
    found = session.exec(
        select(col(Attempt.retryable), col(Attempt.failed_step), func.count().over())
        .where(Attempt.tenant_id == tenant.id)
        .order_by(col(Attempt.number).desc())
        .limit(1)
    ).first()
    retryable, failed_step, attempts = found if found is not None else (None, None, 0)
    return TenantFacts(
        slug=tenant.slug,
        state=TenantState(tenant.state),
        attempts=int(attempts),
        last_failure_retryable=retryable,
        lock_held=lock_held,
        last_failed_step=failed_step,
    )
