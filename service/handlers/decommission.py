"""Decommission: every completed step's compensation, in reverse, as its own chain."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from sagas import rules
from sagas.errors import CommandRejected
from sagas.messages import EventType
from sagas.rules import Reason
from sagas.states import AttemptState, TenantState, move
from sagas.steps import compensation_order
from service import repository as repo
from service.db.engine import unit_of_work
from service.db.models import Decommission
from service.dispatch import DecommissionRef
from service.handlers.answers import Outcome, Request, locked_message
from service.handlers.deps import UseCase
from service.locks import LockToken
from service.outbox import PendingEvents


class DecommissionTenant(UseCase):
    def __call__(self, request: Request) -> Outcome:
        if (seen := self._book.duplicate(request)) is not None:
            return seen
        with Session(self._engine) as session:
            tenant = repo.tenant_by_slug(session, request.slug)
            facts = repo.tenant_facts(session, tenant, lock_held=self._locks.is_held(request.slug))
        try:
            rules.check_decommission(facts, request.slug)
        except CommandRejected as rejected:
            return self._book.reject(request, rejected)
        assert tenant is not None
        run_id = str(uuid.uuid4())
        token = LockToken.new(run_id, tenant.epoch + 1)
        if not self._locks.acquire(request.slug, token):
            return self._book.reject(
                request, CommandRejected(Reason.LOCKED, locked_message(request.slug))
            )
        events = PendingEvents()
        try:
            with unit_of_work(self._engine) as session:
                current = repo.lock_tenant(session, tenant.id)
                if current.epoch != tenant.epoch or current.state not in (
                    TenantState.FAILED,
                    TenantState.ACTIVE,
                    TenantState.DECOMMISSIONING,
                ):
                    raise CommandRejected(Reason.LOCKED, locked_message(request.slug))
                session.add(self._book.processed(request, "accepted"))
                made = repo.made_by_earlier_attempts(session, current.id)
                done = repo.compensated_steps(session, current.id)
                steps = [s for s in compensation_order(set(made)) if s not in done]
                current.epoch += 1
                current.state = move(current, TenantState.DECOMMISSIONING)
                current.updated_at = datetime.now(UTC)
                session.add(current)
                session.add(
                    Decommission(
                        id=run_id,
                        tenant_id=current.id,
                        epoch=current.epoch,
                        state=AttemptState.RUNNING,
                        requested_by=request.requested_by,
                        steps=steps,
                        lock_token=token.encode(),
                    )
                )
                events.add(
                    session,
                    EventType.DECOMMISSION_STARTED,
                    current.slug,
                    {
                        "tenant_id": current.id,
                        "slug": current.slug,
                        "state": current.state,
                        "steps": steps,
                        "requested_by": request.requested_by,
                    },
                )
        except CommandRejected as rejected:
            self._locks.release(request.slug, token)
            return self._book.reject(request, rejected)
        except IntegrityError:
            self._locks.release(request.slug, token)
            if (seen := self._book.duplicate(request)) is not None:
                return seen
            raise
        self._relay.publish_now(events.rows)
        ref = DecommissionRef(slug=request.slug, decommission_id=run_id)
        self._dispatcher.start_decommission(ref, steps)
        return self._book.accepted(
            request,
            EventType.DECOMMISSION_STARTED,
            f"decommissioning {request.slug}: " + (", ".join(steps) or "nothing to undo"),
            tenant_id=tenant.id,
            details={"steps": steps},
        )
