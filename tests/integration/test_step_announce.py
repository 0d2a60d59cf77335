"""Issue 6: a step is announced (``running`` row, ``step_started``) by the transaction that makes
it due, and the task that runs it counts a try only when it is redelivered or retried.

The runner is called in-process, as the step task calls it, with the ``first_delivery`` the task
reads from Celery's request; the chain is not sent (a recording dispatcher).
"""

from __future__ import annotations

import pytest
from sqlmodel import Session, col, select

from config.settings import get_settings
from sagas.errors import StepFailedForGood
from sagas.messages import CommandType
from sagas.steps import STEPS
from service.bootstrap import Container, build_container
from service.db.engine import unit_of_work
from service.db.models import OutboxEvent, StepRun
from service.dispatch import AttemptRef, DecommissionRef
from service.faults import FaultMode
from service.handlers import Request
from service.step_context import RetryLater, StepDone
from tests.support.events import new_slug

pytestmark = pytest.mark.integration


class RecordingDispatcher:
    def __init__(self) -> None:
        self.attempts: list[tuple[AttemptRef, list[str]]] = []

    def start_attempt(self, ref: AttemptRef, steps: list[str]) -> None:
        self.attempts.append((ref, steps))

    def start_decommission(self, ref: DecommissionRef, compensations: list[str]) -> None:
        raise AssertionError("not in these tests")


@pytest.fixture(scope="module")
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@pytest.fixture(scope="module")
def local(services: Container, dispatcher: RecordingDispatcher) -> Container:
    return build_container(get_settings(), dispatcher=dispatcher, run_migrations=False)


def started(local: Container, dispatcher: RecordingDispatcher) -> AttemptRef:
    slug = new_slug("announce")
    outcome = local.handlers.create(Request(CommandType.PROVISION, slug), plan="pro")
    assert outcome.accepted
    ref, steps = dispatcher.attempts[-1]
    assert ref.slug == slug
    assert steps == list(STEPS)
    return ref


def runs(local: Container, ref: AttemptRef) -> dict[str, tuple[str, int]]:
    with Session(local.engine) as session:
        rows = session.exec(select(StepRun).where(StepRun.attempt_id == ref.attempt_id)).all()
        return {r.step: (r.status, r.tries) for r in rows}


def events(local: Container, ref: AttemptRef) -> list[tuple[str, str | None]]:
    """(type without its prefix, step) of the outbox rows of this tenant, in order."""
    import json

    with Session(local.engine) as session:
        rows = session.exec(
            select(OutboxEvent).where(OutboxEvent.subject == ref.slug).order_by(col(OutboxEvent.id))
        ).all()
    out: list[tuple[str, str | None]] = []
    for row in rows:
        data = json.loads(row.body)["data"]
        out.append((row.type.removeprefix("tenant.provisioning."), data.get("step")))
    return out


def test_the_attempt_announces_its_first_step_and_each_step_the_next(
    local: Container, dispatcher: RecordingDispatcher
) -> None:
    ref = started(local, dispatcher)
    assert runs(local, ref) == {"validate": ("running", 1)}
    assert events(local, ref) == [("started", None), ("step_started", "validate")]

    for step in STEPS:
        assert isinstance(local.runner.run_step(ref, step, first_delivery=True), StepDone)

    assert runs(local, ref) == {step: ("completed", 1) for step in STEPS}
    expected: list[tuple[str, str | None]] = [("started", None)]
    for step in STEPS:
        expected += [("step_started", step), ("step_completed", step)]
    expected.append(("completed", None))
    assert events(local, ref) == expected


def test_a_redelivered_step_counts_a_try_and_announces_nothing_again(
    local: Container, dispatcher: RecordingDispatcher
) -> None:
    ref = started(local, dispatcher)
    local.runner.run_step(ref, "validate", first_delivery=True)
    assert runs(local, ref)["reserve_slot"] == ("running", 1)
    before = events(local, ref)

    # The first try of reserve_slot died with its worker; the message comes back redelivered.
    assert isinstance(local.runner.run_step(ref, "reserve_slot", first_delivery=False), StepDone)

    assert runs(local, ref)["reserve_slot"] == ("completed", 2)
    after = events(local, ref)[len(before) :]
    assert after == [("step_completed", "reserve_slot"), ("step_started", "provision_storage")]


def test_a_completed_step_delivered_again_lets_the_chain_go_on_and_writes_nothing(
    local: Container, dispatcher: RecordingDispatcher
) -> None:
    ref = started(local, dispatcher)
    first = local.runner.run_step(ref, "validate", first_delivery=True)
    before_runs, before_events = runs(local, ref), events(local, ref)

    for first_delivery in (False, True):  # redelivered; a duplicate of the message
        again = local.runner.run_step(ref, "validate", first_delivery=first_delivery)
        assert again == first

    assert runs(local, ref) == before_runs
    assert events(local, ref) == before_events


def test_a_step_with_no_announcement_is_announced_by_its_own_task(
    local: Container, dispatcher: RecordingDispatcher
) -> None:
    """A chain sent before steps were announced: its next step's task finds no row."""
    ref = started(local, dispatcher)
    local.runner.run_step(ref, "validate", first_delivery=True)
    # A write transaction from its start (BEGIN IMMEDIATE), as the service's own: a deferred one
    # that read first cannot take the write lock once the outbox marks' thread has written.
    with unit_of_work(local.engine) as session:
        row = session.exec(
            select(StepRun).where(
                StepRun.attempt_id == ref.attempt_id, StepRun.step == "reserve_slot"
            )
        ).one()
        session.delete(row)
    before = events(local, ref)

    local.runner.run_step(ref, "reserve_slot", first_delivery=True)

    assert runs(local, ref)["reserve_slot"] == ("completed", 1)
    assert events(local, ref)[len(before) :] == [
        ("step_started", "reserve_slot"),
        ("step_completed", "reserve_slot"),
        ("step_started", "provision_storage"),
    ]


def test_a_retry_announces_the_step_it_resumes_from_after_the_skipped_ones(
    local: Container, dispatcher: RecordingDispatcher
) -> None:
    ref = started(local, dispatcher)
    local.runner.run_step(ref, "validate", first_delivery=True)
    tries = local.settings.step_tries
    local.faults.add("reserve_slot", mode=FaultMode.ERROR, tenant=ref.slug, times=tries)
    # The first try runs on the announcement; each automatic retry counts one more.
    assert isinstance(local.runner.run_step(ref, "reserve_slot", first_delivery=True), RetryLater)
    for _ in range(tries - 2):
        retried_step = local.runner.run_step(ref, "reserve_slot", first_delivery=False)
        assert isinstance(retried_step, RetryLater)
    with pytest.raises(StepFailedForGood) as failed:
        local.runner.run_step(ref, "reserve_slot", first_delivery=False)
    assert failed.value.tries == tries
    assert runs(local, ref)["reserve_slot"] == ("failed", tries)
    assert local.runner.fail_attempt(ref, "reserve_slot", failed.value)

    outcome = local.handlers.retry(Request(CommandType.RETRY, ref.slug))
    assert outcome.accepted, outcome.message
    retried, steps = dispatcher.attempts[-1]
    assert retried.attempt_number == 2
    assert steps == list(STEPS[1:])

    assert runs(local, retried) == {"validate": ("skipped", 0), "reserve_slot": ("running", 1)}
    assert [e for e in events(local, ref) if e[0] in {"started", "step_skipped"}][-2:] == [
        ("started", None),
        ("step_skipped", "validate"),
    ]
    assert events(local, ref)[-1] == ("step_started", "reserve_slot")
