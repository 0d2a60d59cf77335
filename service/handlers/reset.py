"""Reset: clear a stuck saga without starting an attempt; the old attempt is fenced."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from sagas import rules
from sagas.errors import CommandRejected
from sagas.messages import EventType
from sagas.states import AttemptState, TenantState, move
from service import metrics
from service import repository as repo
from service.db.engine import unit_of_work
from service.handlers.answers import Outcome, Request
from service.handlers.deps import UseCase
from service.outbox import PendingEvents


class ResetTenant(UseCase):
    def __call__(self, request: Request) -> Outcome:
        if (seen := self._book.duplicate(request)) is not None:
            return seen
        with Session(self._engine) as session:
            tenant = repo.tenant_by_slug(session, request.slug)
            facts = repo.tenant_facts(session, tenant, lock_held=False)
        try:
            rules.check_reset(facts, request.slug)
        except CommandRejected as rejected:
            return self._book.reject(request, rejected)
        assert tenant is not None
        events = PendingEvents()
        try:
            with unit_of_work(self._engine) as session:
                current = repo.lock_tenant(session, tenant.id)
                session.add(self._book.processed(request, "accepted"))
                running = repo.last_attempt(session, current.id)
                reset_attempt: int | None = None
                if (
                    current.state == TenantState.PROVISIONING
                    and running is not None
                    and running.state == AttemptState.RUNNING
                ):
                    reset_attempt = running.number
                    running.state = AttemptState.RESET
                    running.ended_at = datetime.now(UTC)
                    session.add(running)
                    current.state = move(current, TenantState.FAILED)
                    current.failure_reason = "reset"
                if (
                    current.state in (TenantState.PROVISIONING, TenantState.DECOMMISSIONING)
                    or reset_attempt is not None
                ):
                    # Fence whatever may still be running, even a decommission chain.
                    current.epoch += 1
                current.updated_at = datetime.now(UTC)
                session.add(current)
                # Deleted before the commit: if the commit fails the lock is merely gone, and the
                # DB epoch (unchanged then) still decides who may write.
                lock_released = self._locks.force_release(request.slug)
                events.add(
                    session,
                    EventType.RESET,
                    current.slug,
                    {
                        "tenant_id": current.id,
                        "slug": current.slug,
                        "state": current.state,
                        "attempt_number": reset_attempt,
                        "reset_attempt": reset_attempt,
                        "lock_released": lock_released,
                        "requested_by": request.requested_by,
                    },
                )
        except IntegrityError:
            if (seen := self._book.duplicate(request)) is not None:
                return seen
            raise
        self._relay.publish_now(events.rows)
        metrics.attempt_reset(reset_attempt)
        if reset_attempt is None:
            message = f"{request.slug} had no running attempt; nothing to reset" + (
                " (a stale lock was released)" if lock_released else ""
            )
        else:
            message = (
                f"attempt {reset_attempt} of {request.slug} reset; the tenant is failed "
                f"and can be retried (provisioner retry {request.slug})"
            )
        return self._book.accepted(
            request,
            EventType.RESET,
            message,
            tenant_id=tenant.id,
            attempt_number=reset_attempt,
            details={"reset_attempt": reset_attempt, "lock_released": lock_released},
        )
