"""Providers that do no work, so that the benchmark measures the saga's own machinery.

Everything else stays real: the lock, the fencing epoch, the fault plans, the outbox, the relay
and the events. ``install()`` must run before ``service.bootstrap`` builds a container; the
bench's worker and listener entry points call it before they import the app.
"""

from __future__ import annotations

import sys

from sqlalchemy import Engine

from sagas.steps import STEPS
from service.providers import registry
from service.providers.base import Output, Provider, StepContext


class NoopProvider:
    """Makes nothing, reports a small output like a real provider's ids, finds it always."""

    step: str

    def __init__(self, step: str) -> None:
        self.step = step

    def run(self, ctx: StepContext) -> Output:
        return {"ref": f"noop:{self.step}:{ctx.slug}"}

    def exists(self, ctx: StepContext, output: Output) -> bool:
        return True

    def compensate(self, ctx: StepContext, output: Output) -> None:
        return None


def build_noop_providers(engine: Engine) -> dict[str, Provider]:
    return {step: NoopProvider(step) for step in STEPS}


def install() -> None:
    """Make every container built from now on use the no-op providers."""
    registry.build_providers = build_noop_providers
    bootstrap = sys.modules.get("service.bootstrap")
    if bootstrap is not None:  # already imported: it holds its own reference
        bootstrap.build_providers = build_noop_providers  # type: ignore[attr-defined]
