"""The operator rules and the resume point, pure functions without I/O."""

from __future__ import annotations

import pytest

from sagas.errors import CommandRejected
from sagas.planning import Made, resume_point
from sagas.rules import (
    FailureFacts,
    TenantFacts,
    check_decommission,
    check_retry,
    is_repeated_failure,
    retries_left,
)
from sagas.states import TenantState
from sagas.steps import STEPS, compensation_order


def facts(
    state: TenantState = TenantState.FAILED,
    attempts: int = 1,
    retryable: bool | None = True,
    lock_held: bool = False,
) -> TenantFacts:
    return TenantFacts("acme", state, attempts, retryable, lock_held)


def reason(fn: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(CommandRejected) as caught:
        fn(*args, **kwargs)  # type: ignore[operator]
    return str(caught.value.reason)


def test_retry_reasons() -> None:
    assert reason(check_retry, None, "acme", max_retries=2, force=False) == "unknown_tenant"
    assert (
        reason(check_retry, facts(TenantState.DECOMMISSIONED), "acme", max_retries=2, force=False)
        == "already_decommissioned"
    )
    assert (
        reason(check_retry, facts(lock_held=True), "acme", max_retries=2, force=False) == "locked"
    )
    assert (
        reason(check_retry, facts(TenantState.ACTIVE), "acme", max_retries=2, force=False)
        == "not_failed"
    )
    assert (
        reason(check_retry, facts(retryable=False), "acme", max_retries=2, force=False)
        == "not_retryable"
    )
    assert (
        reason(check_retry, facts(attempts=3), "acme", max_retries=2, force=False)
        == "retry_cap_reached"
    )
    check_retry(facts(attempts=3), "acme", max_retries=2, force=True)
    check_retry(facts(attempts=2), "acme", max_retries=2, force=False)


def test_not_retryable_wins_over_force() -> None:
    assert (
        reason(check_retry, facts(retryable=False, attempts=9), "acme", max_retries=2, force=True)
        == "not_retryable"
    )


def test_decommission_is_refused_while_provisioning() -> None:
    assert reason(check_decommission, facts(TenantState.PROVISIONING), "acme") == "locked"
    check_decommission(facts(TenantState.ACTIVE), "acme")
    check_decommission(facts(TenantState.DECOMMISSIONING), "acme")


@pytest.mark.parametrize(("attempts", "left"), [(1, 2), (2, 1), (3, 0), (4, 0)])
def test_retries_left_counts_down(attempts: int, left: int) -> None:
    assert retries_left(attempts, 2) == left


def test_repeated_failure_needs_same_step_and_error_type() -> None:
    a = FailureFacts("issue_certificate", "TransientUpstreamError")
    assert is_repeated_failure(a, FailureFacts("issue_certificate", "TransientUpstreamError"))
    assert not is_repeated_failure(a, FailureFacts("issue_certificate", "FatalUpstreamError"))
    assert not is_repeated_failure(a, FailureFacts("check_readiness", "TransientUpstreamError"))
    assert not is_repeated_failure(None, a)


def test_resume_point_reuses_the_verified_prefix() -> None:
    made = {step: Made({"id": step}, 1) for step in STEPS[:5]}
    plan = resume_point(made, lambda step, output: True)
    assert plan.resumed_from == "configure_admin_console"
    assert plan.reused_steps == list(STEPS[:5])


def test_resume_point_stops_at_the_first_missing_step() -> None:
    made = {step: Made({"id": step}, 1) for step in STEPS[:5]}
    plan = resume_point(made, lambda step, output: step != "provision_storage")
    assert plan.resumed_from == "provision_storage"
    assert plan.reused == (("validate", 1), ("reserve_slot", 1))


def test_resume_point_keeps_the_attempt_that_made_each_step() -> None:
    made = {"validate": Made({}, 1), "reserve_slot": Made({}, 2)}
    plan = resume_point(made, lambda step, output: True)
    assert plan.reused == (("validate", 1), ("reserve_slot", 2))
    assert plan.resumed_from == "provision_storage"


def test_nothing_made_starts_at_validate() -> None:
    assert resume_point({}, lambda step, output: True).resumed_from == "validate"


def test_compensations_run_in_reverse_and_skip_checks() -> None:
    assert compensation_order(set(STEPS)) == [
        "activate",
        "configure_admin_console",
        "issue_certificate",
        "register_workflows",
        "provision_storage",
        "reserve_slot",
    ]
    assert compensation_order({"validate", "reserve_slot", "provision_storage"}) == [
        "provision_storage",
        "reserve_slot",
    ]


def test_the_refusal_names_what_failed_for_good() -> None:
    validation = TenantFacts("acme", TenantState.FAILED, 1, False, False, "validate")
    upstream = TenantFacts("acme", TenantState.FAILED, 1, False, False, "issue_certificate")
    with pytest.raises(CommandRejected) as refused:
        check_retry(validation, "acme", max_retries=2, force=False)
    assert "failed validation (bad slug or unknown plan)" in refused.value.message
    with pytest.raises(CommandRejected) as refused:
        check_retry(upstream, "acme", max_retries=2, force=True)
    assert refused.value.reason == "not_retryable"
    assert "failed at issue_certificate" in refused.value.message
    assert "validation" not in refused.value.message
    assert "provisioner decommission acme" in refused.value.message
