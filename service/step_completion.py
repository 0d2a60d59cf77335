"""A step's completion transaction: the fence, the step's row, the tenant's end when it is the
last step, the next step's announcement, and the outbox rows.

It runs once in every step of every saga, so its statements are compiled once per dialect and
run on the driver's cursor (service/db/driver_statements.py): the ORM's unit of work, and then
Core's per-execution work, cost more than the statements themselves (docs/benchmarks.md).
The fence is read in the same transaction as the writes, holding the tenant's row
(``FOR UPDATE OF tenants`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises writers).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, and_, bindparam, select, update
from sqlmodel import col

from config.settings import Settings
from sagas.errors import AttemptFenced, StepFailedForGood
from sagas.messages import EventType
from sagas.states import AttemptState, StepStatus, TenantState, transition
from sagas.steps import next_step
from service.db.driver_statements import DriverStatement
from service.db.engine import WRITE_OPTION
from service.db.models import Attempt, StepRun, Tenant
from service.dispatch import AttemptRef
from service.outbox import OutboxInsert, WrittenEvent, event_values
from service.step_runs import ANNOUNCE_RUN, announced_run, attempt_about


@dataclass(frozen=True, slots=True)
class Completion:
    """What the transaction decided. ``rows``: the outbox rows to publish, in order (none when
    the step had been completed already, by a duplicate of its message)."""

    output: dict[str, Any]
    rows: list[WrittenEvent]
    lock_token: str | None
    final: bool
    attempt_started_at: datetime | None
    now: datetime


# Each execution passes its parameters only; a bound parameter takes its column's type (JSON,
# UTC datetimes).
_FENCE_AND_RUN = (
    select(
        col(Attempt.number),
        col(Attempt.epoch),
        col(Attempt.state),
        col(Attempt.lock_token),
        col(Attempt.started_at),
        col(Tenant.epoch),
        col(Tenant.id),
        col(Tenant.slug),
        col(Tenant.state),
        col(StepRun.id),
        col(StepRun.status),
        col(StepRun.output),
        col(StepRun.tries),
        col(StepRun.error_type),
        col(StepRun.error_message),
    )
    .join(Tenant, col(Tenant.id) == col(Attempt.tenant_id))
    .outerjoin(
        StepRun,
        and_(
            col(StepRun.attempt_id) == col(Attempt.id),
            col(StepRun.step) == bindparam("step"),
        ),
    )
    .where(col(Attempt.id) == bindparam("attempt_id"))
    .with_for_update(of=Tenant)
)
_COMPLETE_RUN = (
    update(StepRun)
    .where(col(StepRun.id) == bindparam("run_id"))
    .values(
        status=StepStatus.COMPLETED.value,
        output=bindparam("output"),
        ended_at=bindparam("now"),
        duration_ms=bindparam("duration_ms"),
    )
)
_ACTIVATE_TENANT = (
    update(Tenant)
    .where(col(Tenant.id) == bindparam("tenant_id"))
    .values(
        state=bindparam("state"),
        failure_reason=None,
        updated_at=bindparam("now"),
    )
)
_SUCCEED_ATTEMPT = (
    update(Attempt)
    .where(col(Attempt.id) == bindparam("attempt_id"))
    .values(
        state=AttemptState.SUCCEEDED.value,
        ended_at=bindparam("now"),
    )
)


class StepCompletion:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._writer = engine.execution_options(**{WRITE_OPTION: True})
        self._settings = settings
        dialect = engine.dialect
        self._fence_and_run = DriverStatement(_FENCE_AND_RUN, dialect)
        self._complete_run = DriverStatement(_COMPLETE_RUN, dialect)
        self._activate_tenant = DriverStatement(_ACTIVATE_TENANT, dialect)
        self._succeed_attempt = DriverStatement(_SUCCEED_ATTEMPT, dialect)
        self._announce_run = DriverStatement(ANNOUNCE_RUN, dialect)
        self._insert_outbox = OutboxInsert(dialect, rows=2)  # a step writes two events

    def complete(
        self, ref: AttemptRef, step: str, output: dict[str, Any], duration_ms: int
    ) -> Completion:
        now = datetime.now(UTC)
        with self._writer.begin() as connection:
            found = self._fence_and_run.first(
                connection, {"step": step, "attempt_id": ref.attempt_id}
            )
            if found is None:
                raise AttemptFenced(f"attempt {ref.attempt_id} does not exist")
            number, attempt_epoch, attempt_state, lock_token, started_at = found[:5]
            tenant_epoch, tenant_id, slug, tenant_state, run_id, run_status, run_output = found[
                5:12
            ]
            if attempt_epoch != tenant_epoch or attempt_state != AttemptState.RUNNING:
                raise AttemptFenced(
                    f"attempt {number} of {slug} is fenced (attempt epoch {attempt_epoch}, "
                    f"tenant epoch {tenant_epoch}, attempt {attempt_state})"
                )
            if run_id is None:
                raise LookupError(f"{step} of attempt {number} of {slug} has no run to complete")
            if run_status == StepStatus.COMPLETED:
                # A second run of the step (a duplicate message) finished after the first: the
                # first one completed it and announced the next step.
                return Completion(dict(run_output or {}), [], lock_token, False, None, now)
            if run_status == StepStatus.FAILED:
                # A duplicate of the message ran the step while its first delivery failed it for
                # good: the failure stands (the attempt's errback ends it).
                tries, error_type, error_message = found[12:]
                raise StepFailedForGood(step, error_type or "Error", error_message or "", tries)
            if run_status != StepStatus.RUNNING:
                raise LookupError(
                    f"{step} of attempt {number} of {slug} is {run_status}, not running"
                )

            self._complete_run.run(
                connection,
                {"run_id": run_id, "output": dict(output), "now": now, "duration_ms": duration_ms},
            )
            following = next_step(step)
            if following is None:
                current = TenantState(tenant_state)
                if current is not TenantState.ACTIVE:
                    tenant_state = transition(current, TenantState.ACTIVE).value
                self._activate_tenant.run(
                    connection, {"tenant_id": tenant_id, "state": tenant_state, "now": now}
                )
                self._succeed_attempt.run(connection, {"attempt_id": ref.attempt_id, "now": now})
            about = attempt_about(tenant_id, slug, tenant_state, number)
            completed = {**about, "step": step, "duration_ms": duration_ms, "output": dict(output)}
            events = [event_values(EventType.STEP_COMPLETED, slug, completed, now=now)]
            if following is not None:
                self._announce_run.run(
                    connection, announced_run(ref.attempt_id, tenant_id, following, now)
                )
                announced = {**about, "step": following}
                events.append(event_values(EventType.STEP_STARTED, slug, announced, now=now))
            else:
                began = started_at.replace(tzinfo=started_at.tzinfo or UTC)
                ended = {
                    **about,
                    "admin_console_url": self._settings.console_url_for(slug),
                    "duration_ms": int((now - began).total_seconds() * 1000),
                }
                events.append(event_values(EventType.COMPLETED, slug, ended, now=now))
            rows = self._insert_outbox.write(connection, events)
        return Completion(dict(output), rows, lock_token, following is None, started_at, now)
