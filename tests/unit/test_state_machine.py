"""Property-based: no sequence of commands and saga outcomes leaves the contract's states.

The model drives the real domain (``sagas.rules`` decides, ``sagas.states.move`` changes state)
the way the handlers and runners do, with no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sagas import rules
from sagas.errors import CommandRejected, InvalidTransition
from sagas.states import ALLOWED, TenantState, move

MAX_RETRIES = 2
S = TenantState


@dataclass
class Tenant:
    state: str
    attempts: int = 1
    last_retryable: bool | None = None
    lock_held: bool = True


def refusal(check: Callable[..., None], *args: object, **kwargs: object) -> str | None:
    """The reason ``check`` refuses with, or None when it allows."""
    try:
        check(*args, **kwargs)
    except CommandRejected as rejected:
        return str(rejected.reason)
    return None


class TenantLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tenant: Tenant | None = None
        self.history: list[str] = []
        self.forced = 0

    def facts(self) -> rules.TenantFacts | None:
        if self.tenant is None:
            return None
        t = self.tenant
        return rules.TenantFacts("acme", S(t.state), t.attempts, t.last_retryable, t.lock_held)

    def go(self, target: TenantState) -> None:
        assert self.tenant is not None
        before = S(self.tenant.state)
        self.tenant.state = move(self.tenant, target)
        assert target is before or target in ALLOWED[before]
        self.history.append(self.tenant.state)

    @rule()
    def create(self) -> None:
        existing = self.facts()
        reason = refusal(rules.check_create, existing, "acme")
        if reason is not None:
            assert reason == "slug_taken"
            return
        # a new tenant (a new tenant_id) for the slug: its own history
        self.tenant = Tenant(state=S.PROVISIONING)
        self.history = [S.PROVISIONING]
        self.forced = 0

    @precondition(lambda self: self.tenant is not None and self.tenant.state == S.PROVISIONING)
    @rule(retryable=st.booleans())
    def attempt_fails(self, retryable: bool) -> None:
        assert self.tenant is not None
        self.go(S.FAILED)
        self.tenant.last_retryable = retryable
        self.tenant.lock_held = False

    @precondition(lambda self: self.tenant is not None and self.tenant.state == S.PROVISIONING)
    @rule()
    def attempt_succeeds(self) -> None:
        assert self.tenant is not None
        self.go(S.ACTIVE)
        self.tenant.lock_held = False

    @rule(force=st.booleans())
    def retry(self, force: bool) -> None:
        reason = refusal(
            rules.check_retry, self.facts(), "acme", max_retries=MAX_RETRIES, force=force
        )
        if reason is not None:
            assert reason in {
                "unknown_tenant",
                "already_decommissioned",
                "locked",
                "not_failed",
                "not_retryable",
                "retry_cap_reached",
            }
            return
        assert self.tenant is not None
        assert self.tenant.state == S.FAILED
        assert self.tenant.last_retryable is not False
        if rules.retries_left(self.tenant.attempts, MAX_RETRIES) == 0:
            assert force
            self.forced += 1
        self.go(S.PROVISIONING)
        self.tenant.attempts += 1
        self.tenant.lock_held = True

    @rule()
    def reset(self) -> None:
        if refusal(rules.check_reset, self.facts(), "acme") is not None:
            return
        assert self.tenant is not None
        if self.tenant.state == S.PROVISIONING:
            self.go(S.FAILED)
            self.tenant.last_retryable = None
        self.tenant.lock_held = False

    @rule()
    def decommission(self) -> None:
        reason = refusal(rules.check_decommission, self.facts(), "acme")
        if reason is not None:
            assert reason in {"unknown_tenant", "already_decommissioned", "locked"}
            return
        assert self.tenant is not None
        self.go(S.DECOMMISSIONING)

    @precondition(lambda self: self.tenant is not None and self.tenant.state == S.DECOMMISSIONING)
    @rule()
    def decommission_finishes(self) -> None:
        self.go(S.DECOMMISSIONED)

    @invariant()
    def only_contract_states(self) -> None:
        if self.tenant is not None:
            assert S(self.tenant.state) in ALLOWED

    @invariant()
    def retries_stay_capped_unless_forced(self) -> None:
        if self.tenant is not None:
            assert self.tenant.attempts - 1 <= MAX_RETRIES + self.forced

    @invariant()
    def decommissioned_is_final(self) -> None:
        if S.DECOMMISSIONED in self.history:
            after = self.history[self.history.index(S.DECOMMISSIONED) :]
            assert all(state == S.DECOMMISSIONED for state in after)


TestTenantLifecycle = TenantLifecycle.TestCase
TestTenantLifecycle.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_invalid_moves_raise() -> None:
    tenant = Tenant(state=S.ACTIVE)
    for target in (S.PROVISIONING, S.FAILED, S.DECOMMISSIONED):
        try:
            move(tenant, target)
        except InvalidTransition:
            continue
        raise AssertionError(f"active -> {target} was allowed")
