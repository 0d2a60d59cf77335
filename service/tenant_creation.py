"""A provisioning command's statements: whether the slug has a live tenant, and the one
transaction that writes the new tenant with its first attempt, the first step's announcement,
the command's processed row and the attempt's two events.

Every saga starts here, so, like a step's completion (service/step_completion.py), the
statements are compiled once per dialect and run on the driver's cursor: through the ORM, the
unit of work's three flushes and its instances cost about 2 ms of CPU a saga, several times the
statements themselves (docs/benchmarks.md, round 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, bindparam, insert, select
from sqlmodel import col

from sagas.messages import EventType
from sagas.states import AttemptState, TenantState
from sagas.steps import STEPS
from service.command_records import INSERT_PROCESSED
from service.db.driver_statements import DriverStatement
from service.db.engine import WRITE_OPTION
from service.db.models import Attempt, Tenant
from service.outbox import OutboxInsert, WrittenEvent, event_values
from service.step_runs import ANNOUNCE_RUN, announced_run, attempt_about

_TENANT_COLUMNS = (
    "id",
    "slug",
    "live_slug",
    "plan",
    "admin_email",
    "state",
    "epoch",
    "created_at",
    "updated_at",
)
_ATTEMPT_COLUMNS = (
    "id",
    "tenant_id",
    "number",
    "epoch",
    "trigger",
    "state",
    "requested_by",
    "resumed_from",
    "reused_steps",
    "lock_token",
    "started_at",
)
_LIVE_STATE = select(col(Tenant.state)).where(col(Tenant.live_slug) == bindparam("slug"))
_INSERT_TENANT = insert(Tenant).values({name: bindparam(name) for name in _TENANT_COLUMNS})
_INSERT_ATTEMPT = insert(Attempt).values({name: bindparam(name) for name in _ATTEMPT_COLUMNS})


@dataclass(frozen=True, slots=True)
class NewTenant:
    tenant_id: str
    attempt_id: str
    slug: str
    plan: str
    admin_email: str | None
    requested_by: str
    lock_token: str


class TenantCreation:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{WRITE_OPTION: True})
        dialect = engine.dialect
        self._live_state = DriverStatement(_LIVE_STATE, dialect)
        self._insert_processed = DriverStatement(INSERT_PROCESSED, dialect)
        self._insert_tenant = DriverStatement(_INSERT_TENANT, dialect)
        self._insert_attempt = DriverStatement(_INSERT_ATTEMPT, dialect)
        self._announce_run = DriverStatement(ANNOUNCE_RUN, dialect)
        self._insert_outbox = OutboxInsert(dialect, rows=2)

    def live_state(self, slug: str) -> str | None:
        """The state of the slug's live tenant (None: the slug is free). A decommissioned
        tenant gives its slug up (``live_slug`` NULL), so it is not found here."""
        with self._engine.connect() as connection:
            row = self._live_state.first(connection, {"slug": slug})
        return None if row is None else str(row[0])

    def write(
        self, new: NewTenant, *, command: dict[str, Any], now: datetime
    ) -> list[WrittenEvent]:
        """Write the tenant, its first attempt (running) and the first step's run, with the
        command's processed row (``command``: service/command_records.py) in the same
        transaction; return the outbox rows (``started``, then the first ``step_started``).

        Raises SQLAlchemy's ``IntegrityError`` when the slug was taken a moment ago (the live
        slug is unique) or the command was handled (its id is the processed row's key)."""
        first = STEPS[0]
        state = TenantState.PROVISIONING.value
        about = attempt_about(new.tenant_id, new.slug, state, 1)
        started = {
            **about,
            "trigger": "create",
            "resumed_from": first,
            "reused_steps": [],
            "requested_by": new.requested_by,
        }
        # Built before the transaction: a CloudEvent is not built while the write lock is held.
        events = [
            event_values(EventType.STARTED, new.slug, started, now=now),
            event_values(EventType.STEP_STARTED, new.slug, {**about, "step": first}, now=now),
        ]
        tenant = {
            "id": new.tenant_id,
            "slug": new.slug,
            "live_slug": new.slug,
            "plan": new.plan,
            "admin_email": new.admin_email,
            "state": state,
            "epoch": 1,
            "created_at": now,
            "updated_at": now,
        }
        attempt = {
            "id": new.attempt_id,
            "tenant_id": new.tenant_id,
            "number": 1,
            "epoch": 1,
            "trigger": "create",
            "state": AttemptState.RUNNING.value,
            "requested_by": new.requested_by,
            "resumed_from": first,
            "reused_steps": [],
            "lock_token": new.lock_token,
            "started_at": now,
        }
        with self._writer.begin() as connection:
            self._insert_processed.run(connection, command)
            self._insert_tenant.run(connection, tenant)
            self._insert_attempt.run(connection, attempt)
            self._announce_run.run(
                connection, announced_run(new.attempt_id, new.tenant_id, first, now)
            )
            return self._insert_outbox.write(connection, events)
