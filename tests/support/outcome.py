"""What the database says happened to a set of tenants: states, attempts, outbox, audit store."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from service.db.models import Attempt, AuditEvent, OutboxEvent, StepRun, Tenant

SETTLED = frozenset({"active", "failed"})


@dataclass(frozen=True)
class TenantOutcome:
    slug: str
    state: str
    failure_reason: str | None
    attempts: list[tuple[int, str]]  # (number, state)


def outcomes(engine: Engine, slugs: list[str]) -> dict[str, TenantOutcome]:
    found: dict[str, TenantOutcome] = {}
    with Session(engine) as session:
        tenants = session.exec(select(Tenant).where(col(Tenant.slug).in_(slugs))).all()
        for tenant in tenants:
            attempts = session.exec(
                select(Attempt).where(Attempt.tenant_id == tenant.id).order_by(col(Attempt.number))
            ).all()
            found[tenant.slug] = TenantOutcome(
                tenant.slug,
                tenant.state,
                tenant.failure_reason,
                [(a.number, a.state) for a in attempts],
            )
    return found


def settled(engine: Engine, slugs: list[str]) -> set[str]:
    return {slug for slug, o in outcomes(engine, slugs).items() if o.state in SETTLED}


def step_runs(engine: Engine, attempt_ids: list[str]) -> list[tuple[str, str, str, int]]:
    """(attempt id, step, status, tries) of these attempts, for before/after comparisons."""
    with Session(engine) as session:
        rows = session.exec(select(StepRun).where(col(StepRun.attempt_id).in_(attempt_ids))).all()
        return sorted((r.attempt_id, r.step, r.status, r.tries) for r in rows)


def attempt_ids(engine: Engine, slug: str, state: str | None = None) -> list[str]:
    with Session(engine) as session:
        tenant = session.exec(select(Tenant).where(Tenant.slug == slug)).one()
        query = select(Attempt).where(Attempt.tenant_id == tenant.id)
        if state is not None:
            query = query.where(Attempt.state == state)
        return [a.id for a in session.exec(query).all()]


def outbox_ids(engine: Engine, subjects: list[str]) -> tuple[list[str], int]:
    """The event ids the outbox holds for these subjects, and how many are unpublished."""
    with Session(engine) as session:
        rows = session.exec(select(OutboxEvent).where(col(OutboxEvent.subject).in_(subjects))).all()
        return [r.event_id for r in rows], sum(r.published_at is None for r in rows)


def audit_ids(engine: Engine, subjects: list[str]) -> list[str]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(AuditEvent.event_id).where(col(AuditEvent.subject).in_(subjects))
            ).all()
        )


def duplicates(ids: list[str]) -> dict[str, int]:
    return {i: n for i, n in Counter(ids).items() if n > 1}
