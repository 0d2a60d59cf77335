"""What one step task does, minus Celery: fence, fault plan, provider, one transaction.

Each public method returns or raises in terms the thin task adapters map onto Celery:
``AttemptFenced`` -> stop the chain quietly; ``StepFailedForGood`` -> let ``link_error``
fail the attempt; a ``RetryLater`` result -> ``self.retry(countdown=...)``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import structlog
from sqlalchemy import Engine
from sqlmodel import Session

from config.settings import Settings
from sagas.errors import AttemptFenced, StepError, StepFailedForGood, TransientUpstreamError
from sagas.messages import EventType
from sagas.states import StepStatus
from service import metrics, tracing
from service import repository as repo
from service.attempt_failure import AttemptFailure
from service.attempt_fence import check_fence, lock_unfenced, raise_if_fenced
from service.db.engine import unit_of_work
from service.db.models import Attempt, Tenant
from service.dispatch import AttemptRef, StepTenant
from service.faults import FaultPlan, FaultPlans
from service.locks import LockToken, TenantLocks
from service.outbox import PendingEvents
from service.preflight import StepPreflight
from service.providers.base import Provider, StepContext
from service.relay import OutboxRelay
from service.step_completion import StepCompletion
from service.step_context import (
    LazyOutputs,
    RetryLater,
    StepDone,
    backoff_delay,
    step_context,
    token_of,
)
from service.step_runs import PickupRead, announce

# Re-exported: the contract tests build attempt events with it.
from service.step_runs import attempt_event_data as attempt_event_data

log = structlog.get_logger(__name__)

LOCK_RENEW_EVERY_S = 5.0


# What a step runs with once picked up: the provider's context and the lock token.
_Begun = tuple[StepContext, "LockToken | None"]


class SagaRunner:
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
        self._completion = StepCompletion(engine, settings)
        self._read_pickup = PickupRead(engine)
        self._preflight = StepPreflight(locks, faults)
        self._failure = AttemptFailure(engine=engine, settings=settings, locks=locks, relay=relay)

    # --- the step ---
    def run_step(
        self,
        ref: AttemptRef,
        step: str,
        *,
        first_delivery: bool = False,
        tenant: StepTenant | None = None,
    ) -> StepDone | RetryLater:
        """Run one step. ``first_delivery``: this is the task message's first delivery of the
        step's first try (not redelivered, not a retry), so a ``running`` row found for it is
        the announcement of the step, not an earlier try that died. ``tenant``: the tenant as
        the message carries it (a message sent before it did carries none)."""
        tracing.annotate_step(ref, step)
        # The short way: the attempt's own lock, still in place, says that no reset and no newer
        # attempt came since the step was announced, so the database need not be read before
        # the provider; the completion's transaction checks the fence in any case.
        confirmed = (
            self._preflight.confirm(ref.slug, ref.attempt_id, step)
            if first_delivery and tenant is not None
            else None
        )
        plan: FaultPlan | None = None
        token: LockToken | None
        if confirmed is not None and tenant is not None:
            ctx, token, plan = self._context_from(ref, tenant), confirmed.token, confirmed.plan
        else:
            begun = self._pick_up(ref, step) if first_delivery else None
            if begun is None:
                begun = self._start_in_transaction(ref, step)
            if isinstance(begun, StepDone):
                return begun
            ctx, token = begun
        started = last_renewal = time.monotonic()

        def keep_lock() -> None:
            # While a step hangs: renew, never retake. A reset deletes the lock, and a hung
            # step that put it back would refuse the operator's retry as `locked`.
            nonlocal last_renewal
            if token is not None and time.monotonic() - last_renewal >= LOCK_RENEW_EVERY_S:
                if not self._locks.extend(ref.slug, token):
                    # Reset (or expired and taken): the operator should see the hung step let go.
                    log.warning("lock.lost_while_hanging", step=step, slug=ref.slug)
                last_renewal = time.monotonic()

        try:
            if confirmed is None:
                # Just past the fence check: we may retake a lock that vanished (Redis restart).
                # The lock only guards; if Redis does not answer, the DB fence has decided: go
                # on. In the same round trip, the step's fault plan (a Redis that does not
                # answer fails the try).
                plan = self._preflight.run(ref.slug, step, token)
            if self._faults.enact(plan, step, while_hanging=keep_lock):
                check_fence(
                    self._engine, ref
                )  # the hang may have outlived a reset: make nothing after it
            output = self._providers[step].run(ctx)
        except AttemptFenced:
            raise
        except StepError as exc:
            return self._step_failed(ref, step, exc)
        except Exception as exc:
            # An unexpected error in a provider is treated as transient: retried, then failed.
            log.exception("step.unexpected_error", step=step, slug=ref.slug)
            wrapped = TransientUpstreamError(f"{type(exc).__name__}: {exc}")
            return self._step_failed(ref, step, wrapped, error_type=type(exc).__name__)
        return self._step_completed(ref, step, output, time.monotonic() - started)

    # --- picking a step up ---
    def _pick_up(self, ref: AttemptRef, step: str) -> _Begun | StepDone | None:
        """The step as the previous step's completion announced it, read without a write:
        None when there is no row to run on (a chain sent before steps were announced)."""
        found = self._read_pickup(ref, step)
        if found is None:
            raise AttemptFenced(f"attempt {ref.attempt_id} does not exist")
        raise_if_fenced(
            found.attempt_number,
            found.attempt_epoch,
            found.attempt_state,
            found.slug,
            found.tenant_epoch,
        )
        if found.run_status is None:
            return None
        if found.run_status == StepStatus.COMPLETED:
            return StepDone(found.run_output)
        if found.run_status == StepStatus.FAILED:
            raise StepFailedForGood(
                step,
                found.run_error_type or "Error",
                found.run_error_message or "",
                found.run_tries,
            )
        # The row's attempt is the message's (read by its id): the same slug and number.
        told = StepTenant(found.tenant_id, found.plan, found.admin_email)
        return self._context_from(ref, told), token_of(found.lock_token)

    def _start_in_transaction(self, ref: AttemptRef, step: str) -> _Begun | StepDone:
        """A redelivery or an automatic retry: count the try in the database (it survives the
        worker), announcing the step if nothing did."""
        events = PendingEvents()
        with unit_of_work(self._engine) as session:
            tenant, attempt = lock_unfenced(session, ref)
            run = repo.step_run(session, attempt.id, step)
            if run is not None and run.status == StepStatus.COMPLETED:
                # A redelivered step that already finished: let the chain go on.
                return StepDone(dict(run.output))
            if run is not None and run.status == StepStatus.FAILED:
                # Redelivered after it failed for good but before the errback ran: fail again.
                raise StepFailedForGood(
                    step, run.error_type or "Error", run.error_message or "", run.tries
                )
            if run is None:
                run = announce(session, events, tenant, attempt, step)
            else:
                run.tries += 1
                session.add(run)
            begun = (self._context(session, tenant, attempt), token_of(attempt.lock_token))
        self._relay.publish_now(events.rows)
        return begun

    def _step_completed(
        self, ref: AttemptRef, step: str, output: dict[str, object], elapsed_s: float
    ) -> StepDone:
        done = self._completion.complete(ref, step, dict(output), int(elapsed_s * 1000))
        if not done.rows:
            return StepDone(done.output)
        token = token_of(done.lock_token)
        # Lock first, then events: whoever reacts to `completed` must find the tenant free.
        if done.final and token is not None:
            self._locks.release_after_commit(ref.slug, token)
        metrics.step_completed(step, elapsed_s)
        if done.final and done.attempt_started_at is not None:
            started = done.attempt_started_at.replace(tzinfo=done.attempt_started_at.tzinfo or UTC)
            metrics.attempt_ended("completed")
            tracing.attempt_ended(ref, "completed", started, done.now)
        self._relay.publish_now(done.rows, with_next_message=True)
        return StepDone(done.output)

    def _step_failed(
        self, ref: AttemptRef, step: str, exc: StepError, error_type: str | None = None
    ) -> StepDone | RetryLater:
        error_type = error_type or exc.error_type
        message = str(exc)[:2000]
        events = PendingEvents()
        with unit_of_work(self._engine) as session:
            tenant, attempt = lock_unfenced(session, ref)
            run = repo.step_run(session, attempt.id, step)
            assert run is not None
            # A duplicate of the step's message failed after the other copy had ended the step:
            # what that copy decided stands, and this one writes nothing.
            if run.status == StepStatus.COMPLETED:
                return StepDone(dict(run.output))
            if run.status == StepStatus.FAILED:
                raise StepFailedForGood(
                    step, run.error_type or "Error", run.error_message or "", run.tries
                )
            # The row's count, not one the task carried: a duplicate of the step's message may
            # run it while the row already counts an automatic retry.
            tries = run.tries
            will_retry = exc.retryable and tries < self._settings.step_tries
            countdown = backoff_delay(self._settings.step_backoff_s, tries)
            run.error_type = error_type
            run.error_message = message
            if will_retry:
                events.add(
                    session,
                    EventType.STEP_RETRYING,
                    tenant.slug,
                    attempt_event_data(
                        tenant,
                        attempt,
                        step=step,
                        error=f"{error_type}: {message}",
                        retry_in_s=countdown,
                        **{"try": tries},
                    ),
                )
            else:
                run.status = StepStatus.FAILED
                run.retryable = exc.retryable
                run.ended_at = datetime.now(UTC)
            session.add(run)
        # Held, where the task holds: `step_retrying` goes out with the retry's message.
        self._relay.publish_now(events.rows, with_next_message=True)
        if not will_retry:
            raise StepFailedForGood(step, error_type, message, tries)
        metrics.step_retrying(step, error_type)
        log.info(
            "step.retrying",
            step=step,
            slug=ref.slug,
            attempt=ref.attempt_number,
            failed_try=tries,
            retry_in_s=countdown,
        )
        return RetryLater(countdown)

    # --- the end of a failed attempt (link_error) ---
    def fail_attempt(self, ref: AttemptRef, step: str | None, exc: BaseException) -> bool:
        """Fail the attempt once: a second call, or a call for a fenced attempt, does nothing."""
        return self._failure.fail(ref, step, exc)

    def release_if_fenced(self, ref: AttemptRef) -> None:
        """A fenced attempt gives back its lock, if it still holds it (never anyone else's)."""
        with Session(self._engine) as session:
            attempt = session.get(Attempt, ref.attempt_id)
            token = token_of(attempt.lock_token) if attempt else None
        if token is not None:
            self._locks.release(ref.slug, token)

    # --- helpers ---
    def _context_from(self, ref: AttemptRef, tenant: StepTenant) -> StepContext:
        """What the provider is told, from the attempt's message (or its pick-up read)."""
        return StepContext(
            tenant_id=tenant.tenant_id,
            slug=ref.slug,
            plan=tenant.plan,
            admin_email=tenant.admin_email,
            attempt_number=ref.attempt_number,
            data_dir=self._settings.data_dir,
            console_url=self._settings.console_url_for(ref.slug),
            outputs=LazyOutputs(self._engine, tenant.tenant_id),
        )

    def _context(self, session: Session, tenant: Tenant, attempt: Attempt) -> StepContext:
        # Outputs are read only if a provider asks (check_readiness does), not in every step.
        return step_context(
            tenant,
            self._settings,
            attempt_number=attempt.number,
            outputs=LazyOutputs(self._engine, tenant.id),
        )
