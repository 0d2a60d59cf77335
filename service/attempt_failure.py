"""The end of a failed attempt (a step's ``link_error``, or a chain that could not be sent): the
attempt and its tenant fail once, the repeated-failure flag is decided against the previous
attempt, the lock is given back, and ``tenant.provisioning.failed`` is published."""

from __future__ import annotations

from datetime import UTC, datetime

import structlog
from sqlalchemy import Engine

from config.settings import Settings
from sagas import rules
from sagas.errors import AttemptFenced
from sagas.messages import EventType
from sagas.states import AttemptState, StepStatus, TenantState, move
from service import metrics, tracing
from service import repository as repo
from service.attempt_fence import lock_unfenced
from service.db.engine import unit_of_work
from service.dispatch import AttemptRef
from service.locks import TenantLocks
from service.outbox import PendingEvents
from service.relay import OutboxRelay
from service.step_context import token_of
from service.step_runs import attempt_event_data

log = structlog.get_logger(__name__)


class AttemptFailure:
    def __init__(
        self, *, engine: Engine, settings: Settings, locks: TenantLocks, relay: OutboxRelay
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._locks = locks
        self._relay = relay

    def fail(self, ref: AttemptRef, step: str | None, exc: BaseException) -> bool:
        """Fail the attempt once: a second call, or a call for a fenced attempt, does nothing."""
        events = PendingEvents()
        with unit_of_work(self._engine) as session:
            try:
                tenant, attempt = lock_unfenced(session, ref)
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
