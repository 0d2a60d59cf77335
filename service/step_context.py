"""What a step or a compensation runs with, and the outcomes both runners return: the
provider's context, the lock token an attempt or a decommission recorded, the backoff between
tries, and the outputs of earlier steps, read only if a provider asks for them."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

from config.settings import Settings
from service import repository as repo
from service.db.models import Tenant
from service.locks import LockToken
from service.providers.base import StepContext


@dataclass(frozen=True, slots=True)
class StepDone:
    output: dict[str, object]


@dataclass(frozen=True, slots=True)
class RetryLater:
    countdown: float


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
