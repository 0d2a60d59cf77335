"""Starting attempts: provisioning a new tenant, and retrying a failed one where it failed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from sagas import rules
from sagas.errors import CommandRejected
from sagas.messages import EventType
from sagas.planning import Made, ResumePlan, resume_point
from sagas.rules import Reason, TenantFacts
from sagas.states import AttemptState, StepStatus, TenantState, move
from sagas.steps import STEPS, steps_from
from service import metrics, tracing
from service import repository as repo
from service.db.engine import unit_of_work
from service.db.models import Attempt, StepRun, Tenant
from service.dispatch import AttemptRef, StepTenant
from service.handlers.answers import Outcome, Request, locked_message
from service.handlers.deps import HandlerDeps, UseCase
from service.locks import LockToken
from service.outbox import PendingEvents
from service.step_context import step_context
from service.tenant_creation import NewTenant, TenantCreation

log = structlog.get_logger(__name__)


class AttemptStarter(UseCase):
    def __init__(self, deps: HandlerDeps) -> None:
        super().__init__(deps)
        self._creation = TenantCreation(deps.engine)

    # --- create ---
    def create(self, request: Request, *, plan: str, admin_email: str | None = None) -> Outcome:
        if (seen := self._book.duplicate(request)) is not None:
            return seen
        try:
            rules.check_create(self._slug_facts(request.slug), request.slug)
        except CommandRejected as rejected:
            return self._book.reject(request, rejected)
        tenant_id, attempt_id = str(uuid.uuid4()), str(uuid.uuid4())
        token = LockToken.new(attempt_id, 1)
        new = NewTenant(
            tenant_id=tenant_id,
            attempt_id=attempt_id,
            slug=request.slug,
            plan=plan,
            admin_email=admin_email,
            requested_by=request.requested_by,
            lock_token=token.encode(),
        )
        try:
            rows = self._creation.write(
                new, command=self._book.processed_values(request, "accepted"), now=datetime.now(UTC)
            )
        except IntegrityError:
            if (seen := self._book.duplicate(request)) is not None:
                return seen
            return self._book.reject(
                request,
                CommandRejected(
                    Reason.SLUG_TAKEN,
                    f"slug {request.slug!r} was just taken by another tenant; pick another slug",
                ),
            )
        # The new tenant owns the slug now; a lock left by an earlier, decommissioned tenant of
        # the same slug is stale (its runs are fenced by their own tenant's epoch).
        if not self._locks.acquire(request.slug, token):
            self._locks.force_release(request.slug)
            self._locks.acquire(request.slug, token)
        self._relay.publish_now(rows)
        metrics.attempt_started("create")
        ref = AttemptRef(slug=request.slug, attempt_number=1, attempt_id=attempt_id)
        self._dispatch_attempt(ref, list(STEPS), StepTenant(tenant_id, plan, admin_email))
        return self._book.accepted(
            request,
            EventType.STARTED,
            f"provisioning {request.slug} started",
            tenant_id=tenant_id,
            attempt_number=1,
        )

    # --- retry ---
    def retry(self, request: Request, *, force: bool = False) -> Outcome:
        if (seen := self._book.duplicate(request)) is not None:
            return seen
        with Session(self._engine) as session:
            tenant = repo.tenant_by_slug(session, request.slug)
            facts = repo.tenant_facts(session, tenant, lock_held=self._locks.is_held(request.slug))
            made = repo.made_by_earlier_attempts(session, tenant.id) if tenant else {}
        # Checked outside any transaction: providers do their own I/O (files, the slot table).
        plan = self._resume_plan(tenant, made) if tenant is not None else None
        try:
            rules.check_retry(
                facts, request.slug, max_retries=self._settings.max_retries, force=force
            )
        except CommandRejected as rejected:
            return self._book.reject(request, rejected)
        assert tenant is not None
        assert plan is not None
        assert facts is not None
        attempt_id = str(uuid.uuid4())
        token = LockToken.new(attempt_id, tenant.epoch + 1)
        if not self._locks.acquire(request.slug, token):
            return self._book.reject(
                request, CommandRejected(Reason.LOCKED, locked_message(request.slug))
            )
        number, now = facts.attempts + 1, datetime.now(UTC)
        # Everything the transaction writes but the tenant's row is known now: the events are
        # built and the step runs laid out before it takes the write lock.
        events, runs = self._retry_writes(request, tenant, attempt_id, number, plan, made, now)
        try:
            with unit_of_work(self._engine) as session:
                current = repo.lock_tenant(session, tenant.id)
                if current.epoch != tenant.epoch or current.state != TenantState.FAILED:
                    # Someone else moved first (another retry, a decommission): refuse.
                    raise CommandRejected(
                        Reason.NOT_FAILED,
                        (
                            f"tenant {request.slug!r} is {current.state}, not failed; "
                            "another command changed it first"
                        ),
                    )
                session.add(self._book.processed(request, "accepted"))
                current.epoch += 1
                current.state = move(current, TenantState.PROVISIONING)
                current.failure_reason = None
                current.updated_at = now
                session.add(current)
                session.add(
                    Attempt(
                        id=attempt_id,
                        tenant_id=current.id,
                        number=number,
                        epoch=current.epoch,
                        trigger="retry",
                        state=AttemptState.RUNNING,
                        requested_by=request.requested_by,
                        resumed_from=plan.resumed_from,
                        reused_steps=plan.reused_steps,
                        lock_token=token.encode(),
                        started_at=now,
                    )
                )
                session.flush()
                # `made` was read before this transaction; the epoch check above proves no step
                # has completed since (steps complete only under the tenant's current epoch).
                session.execute(insert(StepRun), runs)
                events.write_prepared(session)
        except CommandRejected as rejected:
            self._locks.release(request.slug, token)
            return self._book.reject(request, rejected)
        except IntegrityError:
            self._locks.release(request.slug, token)
            if (seen := self._book.duplicate(request)) is not None:
                return seen
            raise
        self._relay.publish_now(events.rows)
        metrics.attempt_started("retry")
        ref = AttemptRef(slug=request.slug, attempt_number=number, attempt_id=attempt_id)
        told = StepTenant(tenant.id, tenant.plan, tenant.admin_email)
        self._dispatch_attempt(ref, list(steps_from(plan.resumed_from)), told)
        return self._book.accepted(
            request,
            EventType.STARTED,
            f"retry of {request.slug} started as attempt {number}, resuming at "
            f"{plan.resumed_from}"
            + (f" (reusing {', '.join(plan.reused_steps)})" if plan.reused_steps else ""),
            tenant_id=tenant.id,
            attempt_number=number,
            details={"resumed_from": plan.resumed_from, "reused_steps": plan.reused_steps},
        )

    # --- helpers ---
    def _slug_facts(self, slug: str) -> TenantFacts | None:
        """The slug's live tenant, read in full only when there is one (to refuse the create)."""
        if self._creation.live_state(slug) is None:
            return None
        with Session(self._engine) as session:
            return repo.tenant_facts(session, repo.tenant_by_slug(session, slug), lock_held=False)

    def _retry_writes(
        self,
        request: Request,
        tenant: Tenant,
        attempt_id: str,
        number: int,
        plan: ResumePlan,
        made: dict[str, Made],
        now: datetime,
    ) -> tuple[PendingEvents, list[dict[str, Any]]]:
        """A retry's events (started, the reused steps skipped, its first step announced) and
        its step runs, in the order they are written."""
        about = {
            "tenant_id": tenant.id,
            "slug": tenant.slug,
            "state": TenantState.PROVISIONING.value,
            "attempt_number": number,
        }
        events = PendingEvents()
        started = {
            **about,
            "trigger": "retry",
            "resumed_from": plan.resumed_from,
            "reused_steps": plan.reused_steps,
            "requested_by": request.requested_by,
        }
        events.prepare(EventType.STARTED, tenant.slug, started, now=now)
        runs: list[dict[str, Any]] = []
        for step, origin in plan.reused:
            runs.append(
                _run_values(attempt_id, tenant.id, step, StepStatus.SKIPPED, now, made, origin)
            )
            skipped = {**about, "step": step, "reused_from_attempt": origin}
            events.prepare(EventType.STEP_SKIPPED, tenant.slug, skipped, now=now)
        first = plan.resumed_from
        runs.append(_run_values(attempt_id, tenant.id, first, StepStatus.RUNNING, now))
        events.prepare(EventType.STEP_STARTED, tenant.slug, {**about, "step": first}, now=now)
        return events, runs

    def _resume_plan(self, tenant: Tenant, made: dict[str, Made]) -> ResumePlan:
        outputs = {step: dict(m.output) for step, m in made.items()}
        ctx = step_context(tenant, self._settings, outputs=outputs)

        def still_exists(step: str, output: Any) -> bool:
            try:
                return self._providers[step].exists(ctx, dict(output))
            except Exception:
                log.warning("resume.exists_check_failed", step=step, slug=tenant.slug)
                return False

        return resume_point(made, still_exists)

    def _dispatch_attempt(self, ref: AttemptRef, steps: list[str], tenant: StepTenant) -> None:
        try:
            with tracing.in_attempt(ref.attempt_id):  # the chain joins the attempt's trace
                self._dispatcher.start_attempt(ref, steps, tenant)
        except Exception as exc:
            # Nothing will run the saga: fail the attempt now rather than leave it provisioning.
            log.exception("dispatch.failed", slug=ref.slug, attempt=ref.attempt_number)
            self._runner.fail_attempt(ref, steps[0], exc)


def _run_values(
    attempt_id: str,
    tenant_id: str,
    step: str,
    status: StepStatus,
    now: datetime,
    made: dict[str, Made] | None = None,
    origin: int | None = None,
) -> dict[str, Any]:
    """A step run as a retry writes it: reused (skipped, with what it made) or announced (its
    first try, running; see service/step_runs.py)."""
    skipped = status == StepStatus.SKIPPED
    return {
        "attempt_id": attempt_id,
        "tenant_id": tenant_id,
        "step": step,
        "status": status.value,
        "tries": 0 if skipped else 1,
        "output": dict(made[step].output) if skipped and made else {},
        "reused_from_attempt": origin,
        "started_at": now,
        "ended_at": now if skipped else None,
    }
