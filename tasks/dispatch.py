"""The Celery side of ``service.dispatch.SagaDispatcher``: build and send the chains."""

from __future__ import annotations

from celery import chain

from service.dispatch import AttemptRef, DecommissionRef, StepTenant
from tasks.steps import (
    COMPENSATE_TASKS,
    STEP_TASKS,
    fail_attempt,
    fail_decommission,
    finish_decommission,
)


class CeleryDispatcher:
    def start_attempt(self, ref: AttemptRef, steps: list[str], tenant: StepTenant) -> None:
        kwargs = ref.as_kwargs()
        facts = tenant.as_kwargs()
        saga = chain(*(STEP_TASKS[step].si(**kwargs, tenant=facts) for step in steps))
        # link_error on a chain links the errback to every task in it.
        saga.link_error(fail_attempt.s(**kwargs))
        saga.apply_async()

    def start_decommission(self, ref: DecommissionRef, compensations: list[str]) -> None:
        kwargs = ref.as_kwargs()
        signatures = [COMPENSATE_TASKS[step].si(**kwargs) for step in compensations]
        signatures.append(finish_decommission.si(**kwargs))
        run = chain(*signatures)
        run.link_error(fail_decommission.s(**kwargs))
        run.apply_async()
