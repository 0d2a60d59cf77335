"""The use cases: create, retry, reset, decommission. One set of rules for every entry point
(the command listener, the CLI, the HTTP API): each calls these and nothing else."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from config.settings import Settings
from sagas import rules
from sagas.errors import CommandRejected
from sagas.messages import CommandType, EventType
from sagas.planning import Made, ResumePlan, resume_point
from sagas.rules import Reason
from sagas.states import AttemptState, StepStatus, TenantState, move
from sagas.steps import STEPS, compensation_order, steps_from
from service import metrics, tracing
from service import repository as repo
from service.db.engine import unit_of_work
from service.db.models import (
    Attempt,
    DeadLetter,
    Decommission,
    ProcessedCommand,
    StepRun,
    Tenant,
)
from service.dispatch import AttemptRef, DecommissionRef, SagaDispatcher
from service.locks import LockToken, TenantLocks
from service.outbox import PendingEvents
from service.providers.base import Provider, StepContext
from service.relay import OutboxRelay
from service.saga_runner import SagaRunner, attempt_event_data

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a command was answered; ``event_type`` is the first event it caused."""

    command_id: str
    command_type: str
    slug: str
    accepted: bool
    event_type: str
    message: str
    reason: str | None = None
    duplicate: bool = False
    tenant_id: str | None = None
    attempt_number: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Request:
    command_type: CommandType
    slug: str
    requested_by: str = "unknown"
    command_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    reason: str | None = None


class Handlers:
    def __init__(
        self,
        *,
        engine: Engine,
        settings: Settings,
        locks: TenantLocks,
        relay: OutboxRelay,
        providers: dict[str, Provider],
        dispatcher: SagaDispatcher,
        runner: SagaRunner,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._locks = locks
        self._relay = relay
        self._providers = providers
        self._dispatcher = dispatcher
        self._runner = runner

    # --- create ---
    def create(self, request: Request, *, plan: str, admin_email: str | None = None) -> Outcome:
        if (seen := self._duplicate(request)) is not None:
            return seen
        with Session(self._engine) as session:
            existing = repo.tenant_by_slug(session, request.slug)
            facts = repo.tenant_facts(session, existing, lock_held=False)
        try:
            rules.check_create(facts, request.slug)
        except CommandRejected as rejected:
            return self._reject(request, rejected)
        tenant_id, attempt_id = str(uuid.uuid4()), str(uuid.uuid4())
        token = LockToken.new(attempt_id, 1)
        events = PendingEvents()
        try:
            with unit_of_work(self._engine) as session:
                session.add(self._processed(request, "accepted"))
                tenant = Tenant(
                    id=tenant_id,
                    slug=request.slug,
                    live_slug=request.slug,
                    plan=plan,
                    admin_email=admin_email,
                    state=TenantState.PROVISIONING,
                    epoch=1,
                )
                attempt = Attempt(
                    id=attempt_id,
                    tenant_id=tenant_id,
                    number=1,
                    epoch=1,
                    trigger="create",
                    state=AttemptState.RUNNING,
                    requested_by=request.requested_by,
                    resumed_from=STEPS[0],
                    reused_steps=[],
                    lock_token=token.encode(),
                )
                session.add(tenant)
                session.flush()
                session.add(attempt)
                session.flush()
                events.add(
                    session,
                    EventType.STARTED,
                    request.slug,
                    attempt_event_data(
                        tenant,
                        attempt,
                        trigger="create",
                        resumed_from=STEPS[0],
                        reused_steps=[],
                        requested_by=request.requested_by,
                    ),
                )
        except IntegrityError:
            if (seen := self._duplicate(request)) is not None:
                return seen
            return self._reject(
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
        self._relay.publish_now(events.rows)
        metrics.attempt_started("create")
        ref = AttemptRef(slug=request.slug, attempt_number=1, attempt_id=attempt_id)
        self._dispatch_attempt(ref, list(STEPS))
        return self._accepted(
            request,
            EventType.STARTED,
            f"provisioning {request.slug} started",
            tenant_id=tenant_id,
            attempt_number=1,
        )

    # --- retry ---
    def retry(self, request: Request, *, force: bool = False) -> Outcome:
        if (seen := self._duplicate(request)) is not None:
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
            return self._reject(request, rejected)
        assert tenant is not None
        assert plan is not None
        assert facts is not None
        attempt_id = str(uuid.uuid4())
        token = LockToken.new(attempt_id, tenant.epoch + 1)
        if not self._locks.acquire(request.slug, token):
            return self._reject(request, CommandRejected(Reason.LOCKED, _locked(request.slug)))
        events = PendingEvents()
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
                session.add(self._processed(request, "accepted"))
                number = facts.attempts + 1
                current.epoch += 1
                current.state = move(current, TenantState.PROVISIONING)
                current.failure_reason = None
                current.updated_at = datetime.now(UTC)
                attempt = Attempt(
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
                )
                session.add(current)
                session.add(attempt)
                session.flush()
                events.add(
                    session,
                    EventType.STARTED,
                    current.slug,
                    attempt_event_data(
                        current,
                        attempt,
                        trigger="retry",
                        resumed_from=plan.resumed_from,
                        reused_steps=plan.reused_steps,
                        requested_by=request.requested_by,
                    ),
                )
                outputs = repo.made_by_earlier_attempts(session, current.id)
                for step, origin in plan.reused:
                    session.add(
                        StepRun(
                            attempt_id=attempt_id,
                            tenant_id=current.id,
                            step=step,
                            status=StepStatus.SKIPPED,
                            output=dict(outputs[step].output),
                            reused_from_attempt=origin,
                            ended_at=datetime.now(UTC),
                        )
                    )
                    events.add(
                        session,
                        EventType.STEP_SKIPPED,
                        current.slug,
                        attempt_event_data(current, attempt, step=step, reused_from_attempt=origin),
                    )
        except CommandRejected as rejected:
            self._locks.release(request.slug, token)
            return self._reject(request, rejected)
        except IntegrityError:
            self._locks.release(request.slug, token)
            if (seen := self._duplicate(request)) is not None:
                return seen
            raise
        self._relay.publish_now(events.rows)
        metrics.attempt_started("retry")
        ref = AttemptRef(slug=request.slug, attempt_number=number, attempt_id=attempt_id)
        self._dispatch_attempt(ref, list(steps_from(plan.resumed_from)))
        return self._accepted(
            request,
            EventType.STARTED,
            f"retry of {request.slug} started as attempt {number}, resuming at "
            f"{plan.resumed_from}"
            + (f" (reusing {', '.join(plan.reused_steps)})" if plan.reused_steps else ""),
            tenant_id=tenant.id,
            attempt_number=number,
            details={"resumed_from": plan.resumed_from, "reused_steps": plan.reused_steps},
        )

    # --- reset ---
    def reset(self, request: Request) -> Outcome:
        if (seen := self._duplicate(request)) is not None:
            return seen
        with Session(self._engine) as session:
            tenant = repo.tenant_by_slug(session, request.slug)
            facts = repo.tenant_facts(session, tenant, lock_held=False)
        try:
            rules.check_reset(facts, request.slug)
        except CommandRejected as rejected:
            return self._reject(request, rejected)
        assert tenant is not None
        events = PendingEvents()
        try:
            with unit_of_work(self._engine) as session:
                current = repo.lock_tenant(session, tenant.id)
                session.add(self._processed(request, "accepted"))
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
            if (seen := self._duplicate(request)) is not None:
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
        return self._accepted(
            request,
            EventType.RESET,
            message,
            tenant_id=tenant.id,
            attempt_number=reset_attempt,
            details={"reset_attempt": reset_attempt, "lock_released": lock_released},
        )

    # --- decommission ---
    def decommission(self, request: Request) -> Outcome:
        if (seen := self._duplicate(request)) is not None:
            return seen
        with Session(self._engine) as session:
            tenant = repo.tenant_by_slug(session, request.slug)
            facts = repo.tenant_facts(session, tenant, lock_held=self._locks.is_held(request.slug))
        try:
            rules.check_decommission(facts, request.slug)
        except CommandRejected as rejected:
            return self._reject(request, rejected)
        assert tenant is not None
        run_id = str(uuid.uuid4())
        token = LockToken.new(run_id, tenant.epoch + 1)
        if not self._locks.acquire(request.slug, token):
            return self._reject(request, CommandRejected(Reason.LOCKED, _locked(request.slug)))
        events = PendingEvents()
        try:
            with unit_of_work(self._engine) as session:
                current = repo.lock_tenant(session, tenant.id)
                if current.epoch != tenant.epoch or current.state not in (
                    TenantState.FAILED,
                    TenantState.ACTIVE,
                    TenantState.DECOMMISSIONING,
                ):
                    raise CommandRejected(Reason.LOCKED, _locked(request.slug))
                session.add(self._processed(request, "accepted"))
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
            return self._reject(request, rejected)
        except IntegrityError:
            self._locks.release(request.slug, token)
            if (seen := self._duplicate(request)) is not None:
                return seen
            raise
        self._relay.publish_now(events.rows)
        ref = DecommissionRef(slug=request.slug, decommission_id=run_id)
        self._dispatcher.start_decommission(ref, steps)
        return self._accepted(
            request,
            EventType.DECOMMISSION_STARTED,
            f"decommissioning {request.slug}: " + (", ".join(steps) or "nothing to undo"),
            tenant_id=tenant.id,
            details={"steps": steps},
        )

    # --- malformed input (the listener's) ---
    def reject_malformed(
        self,
        *,
        command_id: str | None,
        command_type: str | None,
        slug: str | None,
        message: str,
        dead_letter: DeadLetter,
    ) -> Outcome:
        """Keep the message (dead-letter row) and answer it, in one transaction."""
        request_id = command_id or f"malformed-{uuid.uuid4()}"
        rejected = CommandRejected(Reason.MALFORMED, message)
        return self._reject(
            Request(CommandType.PROVISION, slug or "", command_id=request_id),
            rejected,
            command_type=command_type or "unknown",
            record=command_id is not None,
            extra_rows=[dead_letter],
        )

    # --- helpers ---
    def _resume_plan(self, tenant: Tenant, made: dict[str, Made]) -> ResumePlan:
        ctx = StepContext(
            tenant_id=tenant.id,
            slug=tenant.slug,
            plan=tenant.plan,
            admin_email=tenant.admin_email,
            attempt_number=0,
            data_dir=self._settings.data_dir,
            console_url=self._settings.console_url_for(tenant.slug),
            outputs={step: dict(m.output) for step, m in made.items()},
        )

        def still_exists(step: str, output: Any) -> bool:
            try:
                return self._providers[step].exists(ctx, dict(output))
            except Exception:
                log.warning("resume.exists_check_failed", step=step, slug=tenant.slug)
                return False

        return resume_point(made, still_exists)

    def _dispatch_attempt(self, ref: AttemptRef, steps: list[str]) -> None:
        try:
            with tracing.in_attempt(ref.attempt_id):  # the chain joins the attempt's trace
                self._dispatcher.start_attempt(ref, steps)
        except Exception as exc:
            # Nothing will run the saga: fail the attempt now rather than leave it provisioning.
            log.exception("dispatch.failed", slug=ref.slug, attempt=ref.attempt_number)
            self._runner.fail_attempt(ref, steps[0], exc)

    def _duplicate(self, request: Request) -> Outcome | None:
        with Session(self._engine) as session:
            seen = session.get(ProcessedCommand, request.command_id)
        if seen is None:
            return None
        return Outcome(
            command_id=request.command_id,
            command_type=request.command_type.value,
            slug=request.slug,
            accepted=seen.outcome == "accepted",
            duplicate=True,
            event_type="",
            reason=seen.reason,
            message=f"command {request.command_id} was already handled ({seen.outcome})",
        )

    def _processed(
        self, request: Request, outcome: str, reason: str | None = None
    ) -> ProcessedCommand:
        return ProcessedCommand(
            command_id=request.command_id,
            type=request.command_type.value,
            slug=request.slug[:200],
            outcome=outcome,
            reason=reason,
        )

    def _accepted(
        self, request: Request, event_type: EventType, message: str, **kw: Any
    ) -> Outcome:
        log.info(
            "command.accepted",
            command_type=request.command_type.value,
            slug=request.slug,
            command_id=request.command_id,
        )
        return Outcome(
            command_id=request.command_id,
            command_type=request.command_type.value,
            slug=request.slug,
            accepted=True,
            event_type=event_type.value,
            message=message,
            **kw,
        )

    def _reject(
        self,
        request: Request,
        rejected: CommandRejected,
        *,
        command_type: str | None = None,
        record: bool = True,
        extra_rows: list[Any] | None = None,
    ) -> Outcome:
        kind = command_type if command_type is not None else request.command_type.value
        events = PendingEvents()
        try:
            with unit_of_work(self._engine) as session:
                if record:
                    processed = self._processed(request, "rejected", rejected.reason)
                    processed.type = kind[:200]
                    session.add(processed)
                    session.flush()
                for row in extra_rows or []:
                    session.add(row)
                tenant = repo.tenant_by_slug(session, request.slug) if request.slug else None
                events.add(
                    session,
                    EventType.COMMAND_REJECTED,
                    request.slug[:200] or None,
                    {
                        "tenant_id": tenant.id if tenant else None,
                        "slug": request.slug[:200],
                        "state": tenant.state if tenant else None,
                        "command_type": kind,
                        "command_id": request.command_id if record else None,
                        "reason": rejected.reason,
                        "message": rejected.message,
                    },
                )
        except IntegrityError:
            if (seen := self._duplicate(request)) is not None:
                return seen
            raise
        self._relay.publish_now(events.rows)
        log.info("command.rejected", command_type=kind, slug=request.slug, reason=rejected.reason)
        metrics.command_rejected(kind, str(rejected.reason))
        return Outcome(
            command_id=request.command_id,
            command_type=kind,
            slug=request.slug,
            accepted=False,
            event_type=EventType.COMMAND_REJECTED.value,
            message=rejected.message,
            reason=str(rejected.reason),
        )


def _locked(slug: str) -> str:
    return (
        f"tenant {slug!r} is locked by a running attempt; wait for it to end, or, if it is "
        f"stuck, reset first (provisioner reset {slug})"
    )
