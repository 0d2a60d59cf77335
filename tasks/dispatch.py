"""The Celery side of ``service.dispatch.SagaDispatcher``: build and send the chains."""

from __future__ import annotations

from typing import Any

from celery import chain

from service.dispatch import AttemptRef, DecommissionRef, StepTenant
from tasks.app import app
from tasks.steps import (
    COMPENSATE_TASKS,
    STEP_TASKS,
    fail_attempt,
    fail_decommission,
    finish_decommission,
)


def shown_arguments(kwargs: dict[str, Any]) -> dict[str, str]:
    """A chain's task options giving its arguments as Flower and the task events show them,
    worked out once for the whole chain.

    Without them Celery renders each message's arguments with its ``saferepr`` at every hop, in
    the pool process that sends the next step: 26 µs for a step's arguments against 0.7 µs for
    ``repr``, which gives the same text for the short strings, numbers and ``None`` a step
    carries (docs/benchmarks.md, round 10). Arguments longer than Celery would show are left to
    Celery, which shortens them its own way.
    """
    shown = repr(kwargs)
    if len(shown) > app.amqp.kwargsrepr_maxsize:
        return {}
    return {"argsrepr": "()", "kwargsrepr": shown}


def attempt_chain(ref: AttemptRef, steps: list[str], tenant: StepTenant) -> chain:
    kwargs = {**ref.as_kwargs(), "tenant": tenant.as_kwargs()}
    shown = shown_arguments(kwargs)
    saga = chain(*(STEP_TASKS[step].si(**kwargs).set(**shown) for step in steps))
    # link_error on a chain links the errback to every task in it.
    saga.link_error(fail_attempt.s(**ref.as_kwargs()))
    return saga


def decommission_chain(ref: DecommissionRef, compensations: list[str]) -> chain:
    kwargs = ref.as_kwargs()
    shown = shown_arguments(kwargs)
    signatures = [COMPENSATE_TASKS[step].si(**kwargs).set(**shown) for step in compensations]
    signatures.append(finish_decommission.si(**kwargs).set(**shown))
    run = chain(*signatures)
    run.link_error(fail_decommission.s(**kwargs))
    return run


class CeleryDispatcher:
    def start_attempt(self, ref: AttemptRef, steps: list[str], tenant: StepTenant) -> None:
        attempt_chain(ref, steps, tenant).apply_async()

    def start_decommission(self, ref: DecommissionRef, compensations: list[str]) -> None:
        decommission_chain(ref, compensations).apply_async()
