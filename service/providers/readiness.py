"""check_readiness: everything the earlier steps made is still there before going live."""

from __future__ import annotations

from collections.abc import Mapping

from sagas.errors import TransientUpstreamError
from service.providers.base import Output, Provider, StepContext

CHECKED_STEPS: tuple[str, ...] = (
    "reserve_slot",
    "provision_storage",
    "register_workflows",
    "issue_certificate",
    "configure_admin_console",
)


class ReadinessProvider:
    step: str = "check_readiness"

    def __init__(self, providers: Mapping[str, Provider]) -> None:
        missing = [step for step in CHECKED_STEPS if step not in providers]
        if missing:
            raise ValueError(f"readiness needs providers for {', '.join(missing)}")
        self._providers = {step: providers[step] for step in CHECKED_STEPS}

    def run(self, ctx: StepContext) -> Output:
        problems: list[str] = []
        for step, provider in self._providers.items():
            output = ctx.outputs.get(step)
            if output is None:
                problems.append(f"{step} (no output recorded)")
            elif not provider.exists(ctx, output):
                problems.append(f"{step} (its work is gone or damaged)")
        if problems:
            # Transient: a retry resumes from the first step whose work is missing.
            raise TransientUpstreamError(f"tenant is not ready: missing {'; '.join(problems)}")
        return {"checked": list(CHECKED_STEPS)}

    def exists(self, ctx: StepContext, output: Output) -> bool:
        """A check makes nothing that could disappear."""
        return True

    def compensate(self, ctx: StepContext, output: Output) -> None:
        """A check makes nothing, so there is nothing to undo."""
