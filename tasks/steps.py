"""Thin Celery adapters: one named task per saga step and per compensation, plus the errbacks.

All the work is in ``service.saga_runner`` / ``service.decommission_runner``; a task only maps
their outcomes onto Celery (retry with countdown, stop the chain, let link_error fire).
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task
from celery.exceptions import Ignore
from celery.signals import task_postrun, task_prerun, worker_process_shutdown

from sagas.errors import AttemptFenced
from sagas.steps import COMPENSATED, STEPS
from service import held_publishes
from service.bootstrap import built_container, container
from service.dispatch import AttemptRef, DecommissionRef, StepTenant
from service.held_publishes import HELD
from service.reliable_redis import TRANSPORT
from service.step_context import RetryLater
from tasks.app import app

log = structlog.get_logger(__name__)

STEP_TASK_PREFIX = "provisioner.step."
COMPENSATE_TASK_PREFIX = "provisioner.compensate."
TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    # Tries are counted in the database (they survive redelivery); Celery must not cap them.
    "max_retries": None,
}


def _bind_log_context(**values: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**values)


def _first_delivery(task: Task) -> bool:
    """The message's first delivery of the step's first try. A redelivered message (a worker
    lost mid-step, a warm shutdown's reserved messages) or an automatic retry counts a try."""
    delivery_info = task.request.delivery_info or {}
    return not task.request.retries and not delivery_info.get("redelivered", False)


def _make_step_task(step: str) -> Task:
    @app.task(name=f"{STEP_TASK_PREFIX}{step}", **TASK_OPTIONS)
    def step_task(
        self: Task,
        *,
        slug: str,
        attempt_number: int,
        attempt_id: str,
        tenant: object = None,
    ) -> dict[str, Any]:
        _bind_log_context(slug=slug, attempt_number=attempt_number, step=step)
        ref = AttemptRef(slug=slug, attempt_number=attempt_number, attempt_id=attempt_id)
        try:
            outcome = container().runner.run_step(
                ref,
                step,
                first_delivery=_first_delivery(self),
                tenant=StepTenant.from_message(tenant),
            )
        except AttemptFenced as fenced:
            # A reset (or a newer run) superseded this attempt: write nothing, stop the chain.
            log.info("step.fenced", reason=str(fenced))
            container().runner.release_if_fenced(ref)
            raise Ignore() from None
        if isinstance(outcome, RetryLater):
            raise self.retry(countdown=outcome.countdown, max_retries=None)
        return {"step": step, "output": outcome.output}

    return step_task


def _make_compensate_task(step: str) -> Task:
    @app.task(name=f"{COMPENSATE_TASK_PREFIX}{step}", **TASK_OPTIONS)
    def compensate_task(self: Task, *, slug: str, decommission_id: str) -> dict[str, Any]:
        _bind_log_context(slug=slug, decommission_id=decommission_id, step=step)
        ref = DecommissionRef(slug=slug, decommission_id=decommission_id)
        try:
            outcome = container().decommissions.compensate(ref, step)
        except AttemptFenced as fenced:
            log.info("compensation.fenced", reason=str(fenced))
            raise Ignore() from None
        if isinstance(outcome, RetryLater):
            raise self.retry(countdown=outcome.countdown, max_retries=None)
        return {"step": step}

    return compensate_task


STEP_TASKS: dict[str, Task] = {step: _make_step_task(step) for step in STEPS}
COMPENSATE_TASKS: dict[str, Task] = {
    step: _make_compensate_task(step) for step in STEPS if step in COMPENSATED
}


def _step_of(request: Any, prefix: str) -> str | None:
    name = getattr(request, "task", None) or ""
    return name[len(prefix) :] if name.startswith(prefix) else None


@app.task(name="provisioner.fail_attempt", acks_late=True)
def fail_attempt(
    request: Any,
    exc: BaseException,
    traceback: Any,
    *,
    slug: str,
    attempt_number: int,
    attempt_id: str,
) -> bool:
    """link_error of every step: fails the attempt once (later calls find it already ended)."""
    _bind_log_context(slug=slug, attempt_number=attempt_number)
    ref = AttemptRef(slug=slug, attempt_number=attempt_number, attempt_id=attempt_id)
    step = getattr(exc, "step", None) or _step_of(request, STEP_TASK_PREFIX)
    return container().runner.fail_attempt(ref, step, exc)


@app.task(name="provisioner.finish_decommission", **TASK_OPTIONS)
def finish_decommission(self: Task, *, slug: str, decommission_id: str) -> None:
    _bind_log_context(slug=slug, decommission_id=decommission_id)
    try:
        container().decommissions.finish(
            DecommissionRef(slug=slug, decommission_id=decommission_id)
        )
    except AttemptFenced:
        raise Ignore() from None


@app.task(name="provisioner.fail_decommission", acks_late=True)
def fail_decommission(
    request: Any, exc: BaseException, traceback: Any, *, slug: str, decommission_id: str
) -> bool:
    _bind_log_context(slug=slug, decommission_id=decommission_id)
    step = getattr(exc, "step", None) or _step_of(request, COMPENSATE_TASK_PREFIX)
    ref = DecommissionRef(slug=slug, decommission_id=decommission_id)
    return container().decommissions.fail(ref, step, exc)


# On the service's Redis transport, a step's events go out with its next step's message, in one
# round trip (service/held_publishes.py); what no message carried is sent when the task ends.
_HOLDS = app.conf.broker_transport == TRANSPORT


@task_prerun.connect
def _hold_publishes(task: Task | None = None, **_: Any) -> None:
    if _HOLDS and task is not None and task.app is app:
        HELD.start()


@task_postrun.connect
def _send_what_is_held(**_: Any) -> None:
    held = HELD.stop()
    if not held:
        return
    try:
        held_publishes.send(held)
    except Exception as exc:
        # Their rows stay unmarked in the outbox: the relay publishes them.
        log.warning("outbox.publish_deferred", error=str(exc), batches=len(held))


@worker_process_shutdown.connect
def _mark_published_before_exit(**_: Any) -> None:
    # A pool process leaves through os._exit: atexit handlers do not run there.
    built = built_container()
    if built is not None:
        built.relay.flush_marks()
