"""What the handlers need from the task queue; ``tasks/dispatch.py`` provides it with Celery."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class AttemptRef:
    """What every step task carries: shown in Flower as the task's keyword arguments."""

    slug: str
    attempt_number: int
    attempt_id: str

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class StepTenant:
    """What a step's provider is told about its tenant that does not change over the tenant's
    life. Each step's message carries it (one keyword argument, ``tenant``), so that a step whose
    lock shows that nothing happened to its attempt need not read the database before its
    provider (service/saga_runner.py)."""

    tenant_id: str
    plan: str
    admin_email: str | None

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_message(cls, value: object) -> StepTenant | None:
        """The message's ``tenant``, or None when it has none or not in this shape (a message of
        other code): the step then reads the tenant from the database, as before."""
        if not isinstance(value, dict):
            return None
        tenant_id, plan, admin_email = (value.get(k) for k in ("tenant_id", "plan", "admin_email"))
        if not isinstance(tenant_id, str) or not isinstance(plan, str):
            return None
        if admin_email is not None and not isinstance(admin_email, str):
            return None
        return cls(tenant_id, plan, admin_email)


@dataclass(frozen=True, slots=True)
class DecommissionRef:
    slug: str
    decommission_id: str

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)


class SagaDispatcher(Protocol):
    def start_attempt(self, ref: AttemptRef, steps: list[str], tenant: StepTenant) -> None:
        """Run ``steps`` (a suffix of the saga) as one chain for this attempt."""

    def start_decommission(self, ref: DecommissionRef, compensations: list[str]) -> None:
        """Run these compensations, in the order given, then finish the decommission."""
