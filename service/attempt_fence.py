"""The fence of an attempt: a reset (or a newer run) bumps the tenant's epoch, and an attempt
whose epoch is not its tenant's, or that is no longer running, may change nothing."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from sagas.errors import AttemptFenced
from sagas.states import AttemptState
from service.db.models import Attempt, Tenant
from service.dispatch import AttemptRef


def raise_if_fenced(
    number: int, attempt_epoch: int, attempt_state: str, slug: str, tenant_epoch: int
) -> None:
    if attempt_epoch != tenant_epoch or attempt_state != AttemptState.RUNNING:
        raise AttemptFenced(
            f"attempt {number} of {slug} is fenced (attempt epoch {attempt_epoch}, tenant "
            f"epoch {tenant_epoch}, attempt {attempt_state})"
        )


def lock_unfenced(session: Session, ref: AttemptRef) -> tuple[Tenant, Attempt]:
    """Load attempt and tenant, holding the tenant's row; raise if the attempt is fenced."""
    # One query for both (a retried or failing step, the errback); FOR UPDATE OF the tenant is
    # the row lock repo.lock_tenant takes on PostgreSQL.
    found = session.exec(
        select(Attempt, Tenant)
        .join(Tenant, col(Tenant.id) == col(Attempt.tenant_id))
        .where(Attempt.id == ref.attempt_id)
        .with_for_update(of=Tenant)
    ).first()
    if found is None:
        raise AttemptFenced(f"attempt {ref.attempt_id} does not exist")
    attempt, tenant = found
    raise_if_fenced(attempt.number, attempt.epoch, attempt.state, tenant.slug, tenant.epoch)
    return tenant, attempt


def check_fence(engine: Engine, ref: AttemptRef) -> None:
    """The same question as ``lock_unfenced``, read only: no write lock to wait for (SQLite's
    BEGIN IMMEDIATE) and no ORM objects to build."""
    with engine.connect() as connection:
        found = connection.execute(
            select(col(Attempt.number), col(Attempt.epoch), col(Attempt.state), col(Tenant.epoch))
            .join(Tenant, col(Tenant.id) == col(Attempt.tenant_id))
            .where(col(Attempt.id) == ref.attempt_id)
        ).first()
    if found is None:
        raise AttemptFenced(f"attempt {ref.attempt_id} does not exist")
    number, attempt_epoch, attempt_state, tenant_epoch = found
    raise_if_fenced(number, attempt_epoch, attempt_state, ref.slug, tenant_epoch)
