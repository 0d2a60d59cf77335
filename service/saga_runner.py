"""What one step task does, minus Celery: fence, fault plan, provider, one transaction.

Each public method returns or raises in terms the thin task adapters map onto Celery:
``AttemptFenced`` -> stop the chain quietly; ``StepFailedForGood`` -> let ``link_error``
fail the attempt; a ``RetryLater`` result -> ``self.retry(countdown=...)``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from config.settings import Settings
from sagas import rules
from sagas.errors import AttemptFenced, StepError, StepFailedForGood, TransientUpstreamError
from sagas.messages import EventType
from sagas.states import AttemptState, StepStatus, TenantState, move
from service import metrics, tracing
from service import repository as repo
from service.db.engine import unit_of_work
from service.db.models import Attempt, Tenant
from service.dispatch import AttemptRef
from service.faults import FaultPlans
from service.locks import LockToken, TenantLocks
from service.outbox import PendingEvents
from service.preflight import StepPreflight
from service.providers.base import Provider, StepContext
from service.relay import OutboxRelay
from service.step_completion import StepCompletion
from service.step_runs import announce, read_pickup

# Re-exported: the handlers and the contract tests build attempt events with it.
from service.step_runs import attempt_event_data as attempt_event_data

log = structlog.get_logger(__name__)

LOCK_RENEW_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class StepDone:
    output: dict[str, object]


@dataclass(frozen=True, slots=True)
class RetryLater:
    countdown: float


# What a step runs with once picked up: the provider's context, the lock token, the try number.
_Begun = tuple[StepContext, "LockToken | None", int]


def backoff_delay(
    base_s: float, failed_try: int, rand: Callable[[], float] = random.random
) -> float:
    """``base * 2**(try-1)``, jittered by +-20 % so that a burst of failures spreads out."""
    delay: float = base_s * 2.0 ** (failed_try - 1) * (0.8 + 0.4 * rand())
    return round(delay, 3)


def step_context(
    tenant: Tenant,
    settings: Settings,
    *,
    attempt_number: int = 0,
    outputs: Mapping[str, dict[str, Any]] | None = None,
) -> StepContext:
    """What a provider is told about the tenant (attempt 0: outside any attempt)."""
    return StepContext(
        tenant_id=tenant.id,
        slug=tenant.slug,
        plan=tenant.plan,
        admin_email=tenant.admin_email,
        attempt_number=attempt_number,
        data_dir=settings.data_dir,
        console_url=settings.console_url_for(tenant.slug),
        outputs=outputs if outputs is not None else {},
    )


def token_of(raw: str | None) -> LockToken | None:
    return LockToken.decode(raw) if raw else None


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
        self._preflight = StepPreflight(locks, faults)

    # --- the step ---
    def run_step(
        self, ref: AttemptRef, step: str, *, first_delivery: bool = False
    ) -> StepDone | RetryLater:
        """Run one step. ``first_delivery``: this is the task message's first delivery of the
        step's first try (not redelivered, not a retry), so a ``running`` row found for it is
        the announcement of the step, not an earlier try that died."""
        tracing.annotate_step(ref, step)
        begun = self._pick_up(ref, step) if first_delivery else None
        if begun is None:
            begun = self._start_in_transaction(ref, step)
        if isinstance(begun, StepDone):
            return begun
        ctx, token, tries = begun
        started = last_renewal = time.monotonic()

        def keep_lock() -> None:
            # While a step hangs: renew, never retake. A reset deletes the lock, and a hung
            # step that put it back would refuse the operator's retry as `locked`.
            nonlocal last_renewal
            if token is not None and time.monotonic() - last_renewal >= LOCK_RENEW_EVERY_S:
                self._locks.extend(ref.slug, token)
                last_renewal = time.monotonic()

        try:
            # Just past the fence check: we may retake a lock that vanished (Redis restart). The
            # lock only guards; if Redis does not answer, the DB fence has decided: go on. In the
            # same round trip, the step's fault plan (a Redis that does not answer fails the try).
            plan = self._preflight.run(ref.slug, step, token)
            if self._faults.enact(plan, step, while_hanging=keep_lock):
                self._check_fence(ref)  # the hang may have outlived a reset: make nothing after it
            output = self._providers[step].run(ctx)
        except AttemptFenced:
            raise
        except StepError as exc:
            return self._step_failed(ref, step, tries, exc)
        except Exception as exc:
            # An unexpected error in a provider is treated as transient: retried, then failed.
            log.exception("step.unexpected_error", step=step, slug=ref.slug)
            wrapped = TransientUpstreamError(f"{type(exc).__name__}: {exc}")
            return self._step_failed(ref, step, tries, wrapped, error_type=type(exc).__name__)
        return self._step_completed(ref, step, output, time.monotonic() - started)

    # --- picking a step up ---
    def _pick_up(self, ref: AttemptRef, step: str) -> _Begun | StepDone | None:
        """The step as the previous step's completion announced it, read without a write:
        None when there is no row to run on (a chain sent before steps were announced)."""
        found = read_pickup(self._engine, ref, step)
        if found is None:
            raise AttemptFenced(f"attempt {ref.attempt_id} does not exist")
        _raise_if_fenced(
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
        ctx = StepContext(
            tenant_id=found.tenant_id,
            slug=found.slug,
            plan=found.plan,
            admin_email=found.admin_email,
            attempt_number=found.attempt_number,
            data_dir=self._settings.data_dir,
            console_url=self._settings.console_url_for(found.slug),
            outputs=LazyOutputs(self._engine, found.tenant_id),
        )
        return ctx, token_of(found.lock_token), found.run_tries

    def _start_in_transaction(self, ref: AttemptRef, step: str) -> _Begun | StepDone:
        """A redelivery or an automatic retry: count the try in the database (it survives the
        worker), announcing the step if nothing did."""
        events = PendingEvents()
        with unit_of_work(self._engine) as session:
            tenant, attempt = self._fenced(session, ref)
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
            begun = (
                self._context(session, tenant, attempt),
                token_of(attempt.lock_token),
                run.tries,
            )
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
        self._relay.publish_now(done.rows)
        return StepDone(done.output)

    def _step_failed(
        self, ref: AttemptRef, step: str, tries: int, exc: StepError, error_type: str | None = None
    ) -> RetryLater:
        error_type = error_type or exc.error_type
        message = str(exc)[:2000]
        will_retry = exc.retryable and tries < self._settings.step_tries
        events = PendingEvents()
        countdown = backoff_delay(self._settings.step_backoff_s, tries)
        with unit_of_work(self._engine) as session:
            tenant, attempt = self._fenced(session, ref)
            run = repo.step_run(session, attempt.id, step)
            assert run is not None
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
        self._relay.publish_now(events.rows)
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
        events = PendingEvents()
        with unit_of_work(self._engine) as session:
            try:
                tenant, attempt = self._fenced(session, ref)
            except AttemptFenced:
                return False
            run = repo.step_run(session, attempt.id, step) if step else None
            failed = run if run is not None and run.status == StepStatus.FAILED else None
            if failed is not None:
                failed_step, error_type = failed.step, failed.error_type or "Error"
                message, tries = failed.error_message or "", failed.tries
                retryable = bool(failed.retryable)
            else:
                # Our own code failed (not a provider): record what the exception says.
                failed_step = step or "unknown"
                # Only a string: other libraries' `error_type` (redis-py's is an enum) would
                # make the failed event unserialisable and leave the attempt running forever.
                declared = getattr(exc, "error_type", None)
                error_type = declared if isinstance(declared, str) and declared else ""
                error_type = error_type or type(exc).__name__
                message, tries = str(exc)[:2000], run.tries if run else 1
                retryable = bool(getattr(exc, "retryable", True))
                if run is not None:
                    run.status = StepStatus.FAILED
                    run.error_type, run.error_message = error_type, message
                    run.retryable = retryable
                    session.add(run)
            previous = None
            if attempt.number > 1:
                previous = next(
                    (
                        a
                        for a in repo.attempts_of(session, tenant.id)
                        if a.number == attempt.number - 1
                    ),
                    None,
                )
            repeated = rules.is_repeated_failure(
                repo.failure_of(previous), rules.FailureFacts(failed_step, error_type)
            )
            now = datetime.now(UTC)
            attempt.state = AttemptState.FAILED
            attempt.ended_at = now
            attempt.failed_step, attempt.error_type = failed_step, error_type
            attempt.error_message, attempt.tries = message, tries
            attempt.retryable, attempt.repeated_failure = retryable, repeated
            tenant.state = move(tenant, TenantState.FAILED)
            tenant.failure_reason = "step_failed"
            tenant.updated_at = now
            session.add(attempt)
            session.add(tenant)
            events.add(
                session,
                EventType.FAILED,
                tenant.slug,
                attempt_event_data(
                    tenant,
                    attempt,
                    failed_activity=failed_step,
                    details={"error_type": error_type, "message": message, "tries": tries},
                    retryable=retryable,
                    repeated_failure=repeated,
                    retries_left=rules.retries_left(attempt.number, self._settings.max_retries),
                ),
            )
            token = token_of(attempt.lock_token)
            started_at = attempt.started_at
        # Lock first, then events: a retry sent on seeing `failed` must not find it `locked`.
        if token is not None:
            self._locks.release_after_commit(ref.slug, token)
        metrics.attempt_failed(failed_step, error_type, repeated)
        tracing.attempt_ended(ref, "failed", started_at, now)
        self._relay.publish_now(events.rows)
        log.info(
            "attempt.failed",
            slug=ref.slug,
            attempt=ref.attempt_number,
            step=failed_step,
            error_type=error_type,
            repeated_failure=repeated,
        )
        return True

    def release_if_fenced(self, ref: AttemptRef) -> None:
        """A fenced attempt gives back its lock, if it still holds it (never anyone else's)."""
        with Session(self._engine) as session:
            attempt = session.get(Attempt, ref.attempt_id)
            token = token_of(attempt.lock_token) if attempt else None
        if token is not None:
            self._locks.release(ref.slug, token)

    # --- helpers ---
    def _fenced(self, session: Session, ref: AttemptRef) -> tuple[Tenant, Attempt]:
        """Load attempt and tenant, holding the tenant's row; raise if the attempt is fenced."""
        # One query for both (a retried or failing step, the errback); FOR UPDATE OF the
        # tenant is the row lock repo.lock_tenant takes on PostgreSQL.
        found = session.exec(
            select(Attempt, Tenant)
            .join(Tenant, col(Tenant.id) == col(Attempt.tenant_id))
            .where(Attempt.id == ref.attempt_id)
            .with_for_update(of=Tenant)
        ).first()
        if found is None:
            raise AttemptFenced(f"attempt {ref.attempt_id} does not exist")
        attempt, tenant = found
        _raise_if_fenced(attempt.number, attempt.epoch, attempt.state, tenant.slug, tenant.epoch)
        return tenant, attempt

    def _check_fence(self, ref: AttemptRef) -> None:
        # The same question as _fenced, read only: no write lock to wait for (SQLite's BEGIN
        # IMMEDIATE) and no ORM objects to build, in the path of every step.
        with self._engine.connect() as connection:
            found = connection.execute(
                select(
                    col(Attempt.number), col(Attempt.epoch), col(Attempt.state), col(Tenant.epoch)
                )
                .join(Tenant, col(Tenant.id) == col(Attempt.tenant_id))
                .where(col(Attempt.id) == ref.attempt_id)
            ).first()
        if found is None:
            raise AttemptFenced(f"attempt {ref.attempt_id} does not exist")
        number, attempt_epoch, attempt_state, tenant_epoch = found
        _raise_if_fenced(number, attempt_epoch, attempt_state, ref.slug, tenant_epoch)

    def _context(self, session: Session, tenant: Tenant, attempt: Attempt) -> StepContext:
        # Outputs are read only if a provider asks (check_readiness does), not in every step.
        return step_context(
            tenant,
            self._settings,
            attempt_number=attempt.number,
            outputs=LazyOutputs(self._engine, tenant.id),
        )


def _raise_if_fenced(
    number: int, attempt_epoch: int, attempt_state: str, slug: str, tenant_epoch: int
) -> None:
    if attempt_epoch != tenant_epoch or attempt_state != AttemptState.RUNNING:
        raise AttemptFenced(
            f"attempt {number} of {slug} is fenced (attempt epoch {attempt_epoch}, tenant "
            f"epoch {tenant_epoch}, attempt {attempt_state})"
        )


class LazyOutputs(Mapping[str, dict[str, Any]]):
    """What earlier steps of a tenant made (``repo.latest_outputs``), read on first use."""

    def __init__(self, engine: Engine, tenant_id: str) -> None:
        self._engine = engine
        self._tenant_id = tenant_id
        self._loaded: dict[str, dict[str, Any]] | None = None

    def _outputs(self) -> dict[str, dict[str, Any]]:
        if self._loaded is None:
            with Session(self._engine) as session:
                self._loaded = repo.latest_outputs(session, self._tenant_id)
        return self._loaded

    def __getitem__(self, step: str) -> dict[str, Any]:
        return self._outputs()[step]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs())

    def __len__(self) -> int:
        return len(self._outputs())
