"""The operator rules: who may retry, reset or decommission, and what a failure means."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sagas.errors import CommandRejected
from sagas.states import TenantState


class Reason(StrEnum):
    MALFORMED = "malformed"
    UNKNOWN_TENANT = "unknown_tenant"
    SLUG_TAKEN = "slug_taken"
    LOCKED = "locked"
    NOT_FAILED = "not_failed"
    NOT_RETRYABLE = "not_retryable"
    RETRY_CAP_REACHED = "retry_cap_reached"
    ALREADY_DECOMMISSIONED = "already_decommissioned"


@dataclass(frozen=True, slots=True)
class TenantFacts:
    """What the rules need to know about a tenant, read by the caller from wherever it lives."""

    slug: str
    state: TenantState
    attempts: int  # attempts made so far, the first included
    last_failure_retryable: bool | None  # None when the tenant has not failed
    lock_held: bool
    last_failed_step: str | None = None  # the step the last attempt failed at, if it failed


@dataclass(frozen=True, slots=True)
class FailureFacts:
    step: str
    error_type: str


def retries_left(attempts: int, max_retries: int) -> int:
    """Operator retries still allowed without ``force`` after ``attempts`` attempts."""
    return max(0, max_retries - (attempts - 1))


def is_repeated_failure(previous: FailureFacts | None, current: FailureFacts) -> bool:
    return previous is not None and previous == current


def _reject_gone(tenant: TenantFacts | None, slug: str) -> TenantFacts:
    if tenant is None:
        raise CommandRejected(
            Reason.UNKNOWN_TENANT,
            f"no tenant {slug!r}; provision it first (provisioner create {slug} --plan PLAN)",
        )
    if tenant.state is TenantState.DECOMMISSIONED:
        raise CommandRejected(
            Reason.ALREADY_DECOMMISSIONED,
            f"tenant {slug!r} is decommissioned; provision the slug again to get a new tenant",
        )
    return tenant


def check_retry(tenant: TenantFacts | None, slug: str, *, max_retries: int, force: bool) -> None:
    """Raise :class:`CommandRejected` unless a retry of this tenant may start now."""
    tenant = _reject_gone(tenant, slug)
    if tenant.lock_held:
        raise CommandRejected(
            Reason.LOCKED,
            f"tenant {slug!r} is locked by a running attempt; wait for it to end, or, if it is "
            f"stuck, reset first (provisioner reset {slug})",
        )
    if tenant.state is not TenantState.FAILED:
        hint = (
            f"if it is stuck, reset first (provisioner reset {slug})"
            if tenant.state is TenantState.PROVISIONING
            else "only a failed tenant can be retried"
        )
        raise CommandRejected(
            Reason.NOT_FAILED, f"tenant {slug!r} is {tenant.state.value}, not failed; {hint}"
        )
    if tenant.last_failure_retryable is False:
        raise CommandRejected(Reason.NOT_RETRYABLE, _not_retryable_message(tenant, slug))
    if not force and retries_left(tenant.attempts, max_retries) == 0:
        raise CommandRejected(
            Reason.RETRY_CAP_REACHED,
            f"tenant {slug!r} has used {max_retries} of {max_retries} retries; escalate, or "
            f"retry with force (provisioner retry {slug} --force)",
        )


def failed_validation(tenant: TenantFacts) -> bool:
    """The tenant's last failure, one no retry can fix, was its validation (or says no step)."""
    return tenant.last_failed_step in (None, "validate")


def _not_retryable_message(tenant: TenantFacts, slug: str) -> str:
    instead = f"decommission it (provisioner decommission {slug}) and recreate it"
    if failed_validation(tenant):
        return (
            f"tenant {slug!r} failed validation (bad slug or unknown plan), which no retry can "
            f"fix; {instead}"
        )
    return (
        f"tenant {slug!r} failed at {tenant.last_failed_step} with an error that no retry can fix "
        f"(the upstream refused the request); {instead} once the cause is fixed"
    )


def check_decommission(tenant: TenantFacts | None, slug: str) -> None:
    tenant = _reject_gone(tenant, slug)
    if tenant.lock_held or tenant.state is TenantState.PROVISIONING:
        raise CommandRejected(
            Reason.LOCKED,
            f"tenant {slug!r} has a running attempt; wait for it to end, or reset first "
            f"(provisioner reset {slug})",
        )


def check_reset(tenant: TenantFacts | None, slug: str) -> None:
    _reject_gone(tenant, slug)


def check_create(existing: TenantFacts | None, slug: str) -> None:
    if existing is not None and existing.state is not TenantState.DECOMMISSIONED:
        raise CommandRejected(
            Reason.SLUG_TAKEN,
            f"slug {slug!r} belongs to a tenant that is {existing.state.value}; pick another "
            f"slug, or decommission that tenant first",
        )
