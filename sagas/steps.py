"""The provisioning saga's steps, in order, and which of them have a compensation."""

from __future__ import annotations

from typing import Final

STEPS: Final[tuple[str, ...]] = (
    "validate",
    "reserve_slot",
    "provision_storage",
    "register_workflows",
    "issue_certificate",
    "configure_admin_console",
    "check_readiness",
    "activate",
)

# validate and check_readiness make nothing, so there is nothing to undo.
COMPENSATED: Final[frozenset[str]] = frozenset(STEPS) - {"validate", "check_readiness"}

PLANS: Final[frozenset[str]] = frozenset({"free", "pro", "enterprise"})
SLUG_PATTERN: Final[str] = r"^[a-z][a-z0-9-]{2,62}$"


def step_index(step: str) -> int:
    try:
        return STEPS.index(step)
    except ValueError:
        raise KeyError(f"unknown step {step!r}; steps are {', '.join(STEPS)}") from None


def steps_from(step: str) -> tuple[str, ...]:
    """The steps that run when an attempt starts at ``step``."""
    return STEPS[step_index(step) :]


def compensation_order(completed: set[str] | frozenset[str]) -> list[str]:
    """Compensations of the completed steps, last made first undone (the slot is freed last)."""
    return [step for step in reversed(STEPS) if step in completed and step in COMPENSATED]


def next_step(step: str) -> str | None:
    """The step that runs after ``step`` in every chain (a chain is a suffix of STEPS)."""
    index = step_index(step) + 1
    return STEPS[index] if index < len(STEPS) else None
