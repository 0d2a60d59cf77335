"""The tenant state machine of the contract, and attempt outcomes."""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Protocol

from sagas.errors import InvalidTransition


class TenantState(StrEnum):
    PROVISIONING = "provisioning"
    ACTIVE = "active"
    FAILED = "failed"
    DECOMMISSIONING = "decommissioning"
    DECOMMISSIONED = "decommissioned"


class AttemptState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RESET = "reset"


class StepStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    SKIPPED = "skipped"
    FAILED = "failed"


S = TenantState
ALLOWED: Final[dict[TenantState, frozenset[TenantState]]] = {
    S.PROVISIONING: frozenset({S.ACTIVE, S.FAILED}),
    S.FAILED: frozenset({S.PROVISIONING, S.DECOMMISSIONING}),
    # Decommission starts from active too (the contract's Decommission command).
    S.ACTIVE: frozenset({S.DECOMMISSIONING}),
    S.DECOMMISSIONING: frozenset({S.DECOMMISSIONED}),
    S.DECOMMISSIONED: frozenset(),
}


def can_transition(current: TenantState, target: TenantState) -> bool:
    return target in ALLOWED[current]


def transition(current: TenantState, target: TenantState) -> TenantState:
    if not can_transition(current, target):
        raise InvalidTransition(f"a tenant cannot go from {current} to {target}")
    return target


class HasState(Protocol):
    state: str


def move(tenant: HasState, target: TenantState) -> TenantState:
    """The tenant's next state, checked against the contract's state machine; staying put
    (a decommission resumed while decommissioning) is allowed."""
    current = TenantState(tenant.state)
    return current if current is target else transition(current, target)
