"""A step's run row as the saga sees it: announced (``running`` plus ``step_started``) in the
transaction that makes it due, and read back by the task that runs it without a write.

Announcing step k+1 in step k's completion transaction (and the first step in the transaction
that starts the attempt) spares every step a write transaction, a publish and a mark of its own
(docs/benchmarks.md). The task that then runs the step only reads: the fence and the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, bindparam, insert, select
from sqlmodel import Session, col

from sagas.messages import EventType
from sagas.states import StepStatus
from service.db.driver_statements import DriverStatement
from service.db.models import Attempt, StepRun, Tenant
from service.dispatch import AttemptRef
from service.outbox import PendingEvents


def attempt_event_data(tenant: Tenant, attempt: Attempt, **extra: object) -> dict[str, object]:
    return attempt_about(tenant.id, tenant.slug, tenant.state, attempt.number, **extra)


def attempt_about(
    tenant_id: str, slug: str, state: str, attempt_number: int, **extra: object
) -> dict[str, Any]:
    """What every attempt event's data starts with."""
    return {
        "tenant_id": tenant_id,
        "slug": slug,
        "state": state,
        "attempt_number": attempt_number,
        **extra,
    }


# The announcement on the driver's cursor, for the transactions every saga runs (a step's
# completion announces the next step; a tenant's creation its first).
ANNOUNCE_RUN = insert(StepRun).values(
    {
        name: bindparam(name)
        for name in ("attempt_id", "tenant_id", "step", "status", "tries", "output", "started_at")
    }
)


def announced_run(attempt_id: str, tenant_id: str, step: str, now: datetime) -> dict[str, Any]:
    """``ANNOUNCE_RUN``'s parameters: the step's first try, running."""
    return {
        "attempt_id": attempt_id,
        "tenant_id": tenant_id,
        "step": step,
        "status": StepStatus.RUNNING.value,
        "tries": 1,
        "output": {},
        "started_at": now,
    }


def announce(
    session: Session, events: PendingEvents, tenant: Tenant, attempt: Attempt, step: str
) -> StepRun:
    """Write ``step``'s ``running`` row (its first try) and its ``step_started`` event."""
    run = StepRun(
        attempt_id=attempt.id,
        tenant_id=tenant.id,
        step=step,
        status=StepStatus.RUNNING,
        tries=1,
    )
    session.add(run)
    events.add(
        session,
        EventType.STEP_STARTED,
        tenant.slug,
        attempt_event_data(tenant, attempt, step=step),
    )
    return run


@dataclass(frozen=True, slots=True)
class Pickup:
    """What the task of a step reads before it runs: the fence's columns, the tenant as the
    provider is told about it, and the step's run row (``run_status`` None: no row)."""

    attempt_number: int
    attempt_epoch: int
    attempt_state: str
    lock_token: str | None
    tenant_epoch: int
    tenant_id: str
    slug: str
    plan: str
    admin_email: str | None
    tenant_state: str
    run_status: str | None
    run_tries: int
    run_output: dict[str, Any]
    run_error_type: str | None
    run_error_message: str | None


_PICKUP = (
    select(
        col(Attempt.number),
        col(Attempt.epoch),
        col(Attempt.state),
        col(Attempt.lock_token),
        col(Tenant.epoch),
        col(Tenant.id),
        col(Tenant.slug),
        col(Tenant.plan),
        col(Tenant.admin_email),
        col(Tenant.state),
        col(StepRun.status),
        col(StepRun.tries),
        col(StepRun.output),
        col(StepRun.error_type),
        col(StepRun.error_message),
    )
    .join(Tenant, col(Tenant.id) == col(Attempt.tenant_id))
    .outerjoin(
        StepRun,
        and_(col(StepRun.attempt_id) == col(Attempt.id), col(StepRun.step) == bindparam("step")),
    )
    .where(col(Attempt.id) == bindparam("attempt_id"))
)


class PickupRead:
    """The pick-up read of ``engine``'s dialect, compiled once and run on the driver's cursor
    (it runs in every step: service/db/driver_statements.py)."""

    def __init__(self, engine: Engine) -> None:
        # One statement needs no transaction: on PostgreSQL, without one the read costs one
        # round trip, not three (BEGIN, the read, the ROLLBACK of the connection's return).
        # SQLite's reads already run without one (the engine's transactions are explicit).
        self._engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT")
            if engine.dialect.name == "postgresql"
            else engine
        )
        self._statement = DriverStatement(_PICKUP, engine.dialect)

    def __call__(self, ref: AttemptRef, step: str) -> Pickup | None:
        """One read, no write lock (SQLite readers do not wait for writers in WAL mode)."""
        with self._engine.connect() as connection:
            row = self._statement.first(connection, {"step": step, "attempt_id": ref.attempt_id})
        return None if row is None else _pickup(row)


def _pickup(row: tuple[Any, ...]) -> Pickup:
    return Pickup(
        attempt_number=row[0],
        attempt_epoch=row[1],
        attempt_state=row[2],
        lock_token=row[3],
        tenant_epoch=row[4],
        tenant_id=row[5],
        slug=row[6],
        plan=row[7],
        admin_email=row[8],
        tenant_state=row[9],
        run_status=row[10],
        run_tries=row[11] or 0,
        run_output=dict(row[12] or {}),
        run_error_type=row[13],
        run_error_message=row[14],
    )
