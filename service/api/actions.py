"""Which commands a tenant accepts now, by the contract's rules, and why not, in a few words.

The rules themselves are ``sagas.rules`` (what the handlers enforce); this only asks them with the
tenant's facts and turns a refusal into the short reason a disabled button shows.
"""

from __future__ import annotations

from typing import Any

from sagas import rules
from sagas.errors import CommandRejected
from sagas.rules import Reason, TenantFacts
from sagas.states import TenantState


def facts_of(detail: dict[str, Any]) -> TenantFacts:
    attempts = detail["attempts"]
    return TenantFacts(
        slug=detail["slug"],
        state=TenantState(detail["state"]),
        attempts=len(attempts),
        last_failure_retryable=attempts[-1]["retryable"] if attempts else None,
        lock_held=bool(detail["lock"]["held"]),
        last_failed_step=attempts[-1]["failed_step"] if attempts else None,
    )


def _refusal(check: Any) -> CommandRejected | None:
    try:
        check()
    except CommandRejected as rejected:
        return rejected
    return None


def _retry_why(facts: TenantFacts, reason: str, max_retries: int) -> str:
    state = facts.state
    if reason == Reason.LOCKED:
        if state is TenantState.PROVISIONING:
            return "tenant is provisioning: reset first"
        return f"the tenant's lock is held (tenant is {state.value}): reset first"
    if reason == Reason.NOT_FAILED:
        if state is TenantState.PROVISIONING:
            return "tenant is provisioning: reset first"
        if state is TenantState.ACTIVE:
            return "tenant is active: nothing to retry"
        return f"tenant is {state.value}: only a failed tenant can be retried"
    if reason == Reason.NOT_RETRYABLE:
        if rules.failed_validation(facts):
            return "validation failed, which no retry can fix: decommission and recreate"
        return f"{facts.last_failed_step} failed for good: decommission and recreate"
    if reason == Reason.RETRY_CAP_REACHED:
        return f"{max_retries} of {max_retries} retries used: escalate, or retry with force"
    if reason == Reason.ALREADY_DECOMMISSIONED:
        return "tenant is decommissioned"
    return reason


def available_actions(detail: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{name, enabled, why}]`` for retry, retry with force, reset and decommission."""
    facts = facts_of(detail)
    slug, max_retries = detail["slug"], int(detail["max_retries"])
    used = max(0, facts.attempts - 1)

    def check_retry(force: bool) -> CommandRejected | None:
        return _refusal(
            lambda: rules.check_retry(facts, slug, max_retries=max_retries, force=force)
        )

    retry = check_retry(False)
    if retry is None:
        retry_why = f"{used} of {max_retries} retries used; resumes where the last attempt failed"
    else:
        retry_why = _retry_why(facts, retry.reason, max_retries)
    capped = retry is not None and retry.reason == Reason.RETRY_CAP_REACHED
    forced = check_retry(True) if capped else retry
    force_why = (
        f"past the cap ({max_retries} of {max_retries} retries used)"
        if capped and forced is None
        else "only when the retry cap is reached"
        if retry is None
        else _retry_why(facts, (forced or retry).reason, max_retries)
    )

    reset = _refusal(lambda: rules.check_reset(facts, slug))
    stuck = facts.state in (TenantState.PROVISIONING, TenantState.DECOMMISSIONING)
    if reset is not None:
        reset_ok, reset_why = False, "tenant is decommissioned"
    elif stuck or facts.lock_held:
        reset_ok = True
        reset_why = (
            f"stop the {facts.state.value} run: fence it, release the lock, mark the tenant failed"
            if stuck
            else "release the lock still held although no run is going on"
        )
    else:
        reset_ok, reset_why = (
            False,
            f"tenant is {facts.state.value} and holds no lock: nothing to reset",
        )

    decommission = _refusal(lambda: rules.check_decommission(facts, slug))
    if decommission is None:
        decommission_why = "undo every step in reverse, free the slot and the slug"
    elif decommission.reason == Reason.ALREADY_DECOMMISSIONED:
        decommission_why = "tenant is decommissioned"
    elif facts.state is TenantState.PROVISIONING:
        decommission_why = "tenant is provisioning: wait for it to end, or reset first"
    else:
        decommission_why = "the tenant's lock is held: wait for the run to end, or reset first"

    return [
        {"name": "retry", "enabled": retry is None, "why": retry_why},
        {"name": "retry_force", "enabled": capped and forced is None, "why": force_why},
        {"name": "reset", "enabled": reset_ok, "why": reset_why},
        {"name": "decommission", "enabled": decommission is None, "why": decommission_why},
    ]
