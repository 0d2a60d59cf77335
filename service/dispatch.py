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
