"""A chain's steps carry their arguments as Flower shows them, worked out once at dispatch
(tasks/dispatch.py): the text must be what Celery's own ``saferepr`` would have given."""

from __future__ import annotations

from celery.utils.saferepr import saferepr

from sagas.steps import STEPS
from service.dispatch import AttemptRef, DecommissionRef, StepTenant
from tasks.app import app
from tasks.dispatch import attempt_chain, decommission_chain, shown_arguments

REF = AttemptRef(slug="acme-corp", attempt_number=2, attempt_id="0b9c6f8e-1e2f-4c1a-9d3e")


def _celery_shows(kwargs: dict[str, object]) -> str:
    shown: str = saferepr(
        kwargs, app.amqp.kwargsrepr_maxsize, maxlevels=app.conf.task_repr_maxlevels
    )
    return shown


def test_a_steps_arguments_read_as_celery_would_show_them() -> None:
    for tenant in (
        StepTenant("7f0e5a4b", "pro", "ops@example.com"),
        StepTenant("7f0e5a4b", "free", None),
        StepTenant("7f0e5a4b", "pro", "bjørn@exämple.com"),
    ):
        kwargs = {**REF.as_kwargs(), "tenant": tenant.as_kwargs()}
        assert shown_arguments(kwargs) == {"argsrepr": "()", "kwargsrepr": _celery_shows(kwargs)}


def test_every_step_of_an_attempts_chain_carries_them() -> None:
    tenant = StepTenant("7f0e5a4b", "pro", "ops@example.com")
    saga = attempt_chain(REF, list(STEPS), tenant)
    expected = _celery_shows({**REF.as_kwargs(), "tenant": tenant.as_kwargs()})
    assert [task.task for task in saga.tasks] == [f"provisioner.step.{step}" for step in STEPS]
    for task in saga.tasks:
        assert task.options["kwargsrepr"] == expected
        assert task.options["argsrepr"] == "()"


def test_every_task_of_a_decommission_carries_them() -> None:
    ref = DecommissionRef(slug="acme-corp", decommission_id="d-1")
    run = decommission_chain(ref, ["activate", "reserve_slot"])
    for task in run.tasks:
        assert task.options["kwargsrepr"] == _celery_shows(ref.as_kwargs())


def test_arguments_longer_than_celery_shows_are_left_to_celery() -> None:
    long = {"slug": "x" * (app.amqp.kwargsrepr_maxsize + 10)}
    assert shown_arguments(long) == {}
    assert "..." in _celery_shows(long)  # Celery shortens them
