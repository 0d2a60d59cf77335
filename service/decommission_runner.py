"""What one compensation task does, minus Celery: fence, fault plan, provider, one transaction."""

from __future__ import annotations

from datetime import UTC, datetime

import structlog
from sqlalchemy import Engine
from sqlmodel import Session

from config.settings import Settings
from sagas.errors import AttemptFenced, StepError, StepFailedForGood, TransientUpstreamError
from sagas.messages import EventType
from sagas.states import AttemptState, StepStatus, TenantState, move
from service import repository as repo
from service.db.engine import unit_of_work
from service.db.models import Compensation, Decommission, Tenant
from service.dispatch import DecommissionRef
from service.faults import FaultPlans
from service.locks import LockToken, TenantLocks
from service.outbox import PendingEvents
from service.providers.base import Provider
from service.relay import OutboxRelay
from service.step_context import RetryLater, StepDone, backoff_delay, step_context, token_of

log = structlog.get_logger(__name__)


def decommission_event_data(tenant: Tenant, **extra: object) -> dict[str, object]:
    return {"tenant_id": tenant.id, "slug": tenant.slug, "state": tenant.state, **extra}


class DecommissionRunner:
    def __init__(
        self,
        *,
        engine: Engine,
        settings: Settings,
        providers: dict[str, Provider],
        locks: TenantLocks,
        faults: FaultPlans,
        relay: OutboxRelay,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._providers = providers
        self._locks = locks
        self._faults = faults
        self._relay = relay

    def compensate(self, ref: DecommissionRef, step: str) -> StepDone | RetryLater:
        with unit_of_work(self._engine) as session:
            tenant, run = self._fenced(session, ref)
            done = repo.compensation(session, tenant.id, step)
            if done is not None and done.status == StepStatus.COMPLETED:
                return StepDone({})
            if done is None:
                done = Compensation(
                    tenant_id=tenant.id,
                    decommission_id=run.id,
                    step=step,
                    status=StepStatus.RUNNING,
                    tries=1,
                )
            else:
                done.decommission_id = run.id
                done.status = StepStatus.RUNNING
                done.tries += 1
            session.add(done)
            output = repo.latest_outputs(session, tenant.id).get(step, {})
            ctx = step_context(tenant, self._settings)
            tries = done.tries
            token = token_of(run.lock_token)
        if token is not None:
            self._locks.retake_after_fence_check(ref.slug, token)
        try:
            # A fault plan on a step applies to its compensation too: the same upstream.
            self._faults.apply(step, ref.slug, while_hanging=lambda: self._renew(ref, token))
            self._providers[step].compensate(ctx, output)
        except Exception as exc:
            error = exc if isinstance(exc, StepError) else TransientUpstreamError(str(exc))
            return self._compensation_failed(ref, step, tries, error, type(exc).__name__)
        events = PendingEvents()
        with unit_of_work(self._engine) as session:
            tenant, _ = self._fenced(session, ref)
            done = repo.compensation(session, tenant.id, step)
            assert done is not None
            done.status = StepStatus.COMPLETED
            done.ended_at = datetime.now(UTC)
            session.add(done)
            events.add(
                session,
                EventType.DECOMMISSION_STEP_COMPLETED,
                tenant.slug,
                decommission_event_data(tenant, step=step),
            )
        self._relay.publish_now(events.rows)
        return StepDone({})

    def _compensation_failed(
        self, ref: DecommissionRef, step: str, tries: int, exc: StepError, error_type: str
    ) -> RetryLater:
        will_retry = exc.retryable and tries < self._settings.step_tries
        with unit_of_work(self._engine) as session:
            tenant, _ = self._fenced(session, ref)
            done = repo.compensation(session, tenant.id, step)
            assert done is not None
            done.error_type, done.error_message = error_type, str(exc)[:2000]
            if not will_retry:
                done.status = StepStatus.FAILED
            session.add(done)
        if not will_retry:
            raise StepFailedForGood(step, error_type, str(exc), tries)
        countdown = backoff_delay(self._settings.step_backoff_s, tries)
        log.info("compensation.retrying", step=step, slug=ref.slug, failed_try=tries)
        return RetryLater(countdown)

    def finish(self, ref: DecommissionRef) -> None:
        events = PendingEvents()
        with unit_of_work(self._engine) as session:
            tenant, run = self._fenced(session, ref)
            now = datetime.now(UTC)
            tenant.state = move(tenant, TenantState.DECOMMISSIONED)
            tenant.live_slug = None  # the slug is free for a new tenant
            tenant.updated_at = now
            run.state = AttemptState.SUCCEEDED
            run.ended_at = now
            session.add(tenant)
            session.add(run)
            events.add(
                session,
                EventType.DECOMMISSION_COMPLETED,
                tenant.slug,
                decommission_event_data(tenant),
            )
            token = token_of(run.lock_token)
        if token is not None:
            self._locks.release_after_commit(ref.slug, token)
        self._relay.publish_now(events.rows)

    def fail(self, ref: DecommissionRef, step: str | None, exc: BaseException) -> bool:
        events = PendingEvents()
        with unit_of_work(self._engine) as session:
            try:
                tenant, run = self._fenced(session, ref)
            except AttemptFenced:
                return False
            run.state = AttemptState.FAILED
            run.ended_at = datetime.now(UTC)
            run.failed_step = step
            run.error_message = str(exc)[:2000]
            session.add(run)
            events.add(
                session,
                EventType.DECOMMISSION_FAILED,
                tenant.slug,
                decommission_event_data(
                    tenant,
                    step=step,
                    error=str(exc)[:2000],
                    message=f"run `provisioner decommission {tenant.slug}` again to resume",
                ),
            )
            token = token_of(run.lock_token)
        if token is not None:
            self._locks.release_after_commit(ref.slug, token)
        self._relay.publish_now(events.rows)
        return True

    def _renew(self, ref: DecommissionRef, token: LockToken | None) -> None:
        """While a compensation hangs: renew the lock, never retake it (see SagaRunner)."""
        if token is not None:
            self._locks.extend(ref.slug, token)

    def _fenced(self, session: Session, ref: DecommissionRef) -> tuple[Tenant, Decommission]:
        run = session.get(Decommission, ref.decommission_id)
        if run is None:
            raise AttemptFenced(f"decommission {ref.decommission_id} does not exist")
        tenant = repo.lock_tenant(session, run.tenant_id)
        if run.epoch != tenant.epoch or run.state != AttemptState.RUNNING:
            raise AttemptFenced(f"decommission {run.id} of {tenant.slug} is fenced")
        return tenant, run
