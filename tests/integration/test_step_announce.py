"""Issue 6: a step is announced (``running`` row, ``step_started``) by the transaction that makes
it due, and the task that runs it counts a try only when it is redelivered or retried. On its
message's first delivery, a step whose attempt still holds the tenant's lock runs without reading
the database first (the tenant travels in the message); any other step reads it.

The runner is called in-process, as the step task calls it, with the ``first_delivery`` the task
reads from Celery's request; the chain is not sent (a recording dispatcher).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlmodel import Session, col, select

from config.settings import get_settings
from sagas.errors import AttemptFenced, StepFailedForGood
from sagas.messages import CommandType
from sagas.steps import STEPS
from service.bootstrap import Container, build_container
from service.db.engine import unit_of_work
from service.db.models import Attempt, OutboxEvent, ProcessedCommand, StepRun, Tenant
from service.dispatch import AttemptRef, DecommissionRef, StepTenant
from service.events import read_event
from service.faults import FaultMode
from service.handlers import Request
from service.step_context import RetryLater, StepDone
from service.step_runs import Pickup, PickupRead
from tests.support.events import new_slug

pytestmark = pytest.mark.integration


class RecordingDispatcher:
    def __init__(self) -> None:
        self.attempts: list[tuple[AttemptRef, list[str]]] = []
        self.tenants: dict[str, StepTenant] = {}  # by attempt id: what each step's message carries

    def start_attempt(self, ref: AttemptRef, steps: list[str], tenant: StepTenant) -> None:
        self.attempts.append((ref, steps))
        self.tenants[ref.attempt_id] = tenant

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


class PickupReads:
    """Counts the database reads a step makes before its provider (``PickupRead``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        read = PickupRead.__call__

        def counted(this: PickupRead, ref: AttemptRef, step: str) -> Pickup | None:
            self.count += 1
            return read(this, ref, step)

        monkeypatch.setattr(PickupRead, "__call__", counted)


@pytest.fixture
def pickup_reads(monkeypatch: pytest.MonkeyPatch) -> PickupReads:
    return PickupReads(monkeypatch)


@pytest.mark.parametrize("carried", [True, False], ids=["tenant-in-message", "older-message"])
def test_the_attempt_announces_its_first_step_and_each_step_the_next(
    local: Container, dispatcher: RecordingDispatcher, pickup_reads: PickupReads, carried: bool
) -> None:
    ref = started(local, dispatcher)
    tenant = dispatcher.tenants[ref.attempt_id] if carried else None
    assert runs(local, ref) == {"validate": ("running", 1)}
    assert events(local, ref) == [("started", None), ("step_started", "validate")]

    for step in STEPS:
        done = local.runner.run_step(ref, step, first_delivery=True, tenant=tenant)
        assert isinstance(done, StepDone)

    # With its tenant in the message and its attempt's lock in place, no step read first.
    assert pickup_reads.count == (0 if carried else len(STEPS))

    assert runs(local, ref) == {step: ("completed", 1) for step in STEPS}
    expected: list[tuple[str, str | None]] = [("started", None)]
    for step in STEPS:
        expected += [("step_started", step), ("step_completed", step)]
    expected.append(("completed", None))
    assert events(local, ref) == expected


def test_the_creation_writes_its_rows_as_the_models_read_them(
    local: Container, dispatcher: RecordingDispatcher
) -> None:
    # The creation's transaction runs on the driver's cursor (service/tenant_creation.py): what
    # it writes must read back through the ORM as the models' own writes would.
    slug = new_slug("creation")
    request = Request(CommandType.PROVISION, slug, requested_by="alice")
    before = datetime.now(UTC)
    outcome = local.handlers.create(request, plan="pro", admin_email="ops@example.com")
    assert outcome.accepted
    ref, _steps = dispatcher.attempts[-1]
    with Session(local.engine) as session:
        tenant = session.exec(select(Tenant).where(Tenant.slug == slug)).one()
        attempt = session.exec(select(Attempt).where(Attempt.id == ref.attempt_id)).one()
        processed = session.get(ProcessedCommand, request.command_id)
        rows = session.exec(
            select(OutboxEvent).where(OutboxEvent.subject == slug).order_by(col(OutboxEvent.id))
        ).all()
    assert (tenant.id, tenant.live_slug, tenant.plan, tenant.admin_email) == (
        outcome.tenant_id,
        slug,
        "pro",
        "ops@example.com",
    )
    assert (tenant.state, tenant.epoch, tenant.failure_reason) == ("provisioning", 1, None)
    assert tenant.created_at == tenant.updated_at == attempt.started_at
    assert tenant.created_at.tzinfo is not None
    assert tenant.created_at >= before
    assert (attempt.tenant_id, attempt.number, attempt.epoch) == (tenant.id, 1, 1)
    assert (attempt.trigger, attempt.state, attempt.requested_by) == ("create", "running", "alice")
    assert (attempt.resumed_from, attempt.reused_steps) == ("validate", [])
    assert attempt.lock_token is not None
    assert local.locks.is_held(slug)
    assert (attempt.ended_at, attempt.failed_step) == (None, None)
    assert processed is not None
    assert (processed.type, processed.slug, processed.outcome, processed.reason) == (
        "tenant.provision_requested",
        slug,
        "accepted",
        None,
    )
    assert [row.type for row in rows] == [
        "tenant.provisioning.started",
        "tenant.provisioning.step_started",
    ]
    started, announced = (read_event(row.body) for row in rows)
    assert [started["id"], announced["id"]] == [row.event_id for row in rows]
    assert started["data"] == {
        "tenant_id": tenant.id,
        "slug": slug,
        "state": "provisioning",
        "attempt_number": 1,
        "trigger": "create",
        "resumed_from": "validate",
        "reused_steps": [],
        "requested_by": "alice",
    }
    assert announced["data"] == {
        "tenant_id": tenant.id,
        "slug": slug,
        "state": "provisioning",
        "attempt_number": 1,
        "step": "validate",
    }
    # the same command again acts no more; another command for the live slug is refused
    assert local.handlers.create(request, plan="pro").duplicate
    taken = local.handlers.create(Request(CommandType.PROVISION, slug), plan="free")
    assert (taken.accepted, taken.reason) == (False, "slug_taken")
    assert [a for a in dispatcher.attempts if a[0].slug == slug] == [(ref, list(STEPS))]


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


def test_the_message_tells_the_provider_what_the_database_would(
    local: Container, dispatcher: RecordingDispatcher
) -> None:
    slug = new_slug("told")
    request = Request(CommandType.PROVISION, slug)
    outcome = local.handlers.create(request, plan="enterprise", admin_email="ops@example.com")
    assert outcome.accepted
    ref, _steps = dispatcher.attempts[-1]
    assert dispatcher.tenants[ref.attempt_id] == StepTenant(
        outcome.tenant_id or "", "enterprise", "ops@example.com"
    )
    tenant = dispatcher.tenants[ref.attempt_id]
    for step in ("validate", "reserve_slot", "provision_storage"):
        local.runner.run_step(ref, step, first_delivery=True, tenant=tenant)
    with Session(local.engine) as session:
        outputs = {
            r.step: r.output
            for r in session.exec(select(StepRun).where(StepRun.attempt_id == ref.attempt_id))
        }
    assert outputs["validate"] == {"slug": slug, "plan": "enterprise"}
    assert outputs["provision_storage"]["storage_id"] == outcome.tenant_id


def test_a_reset_stops_a_step_before_its_provider_though_its_message_carries_the_tenant(
    local: Container, dispatcher: RecordingDispatcher, pickup_reads: PickupReads
) -> None:
    ref = started(local, dispatcher)
    tenant = dispatcher.tenants[ref.attempt_id]
    local.runner.run_step(ref, "validate", first_delivery=True, tenant=tenant)
    assert local.handlers.reset(Request(CommandType.RESET, ref.slug)).accepted
    # A plan the step would spend at its provider: left whole, it shows the step stopped before.
    plan = local.faults.add("reserve_slot", mode=FaultMode.ERROR, tenant=ref.slug, times=1)
    try:
        with pytest.raises(AttemptFenced):
            local.runner.run_step(ref, "reserve_slot", first_delivery=True, tenant=tenant)
        assert local.faults.exists(plan.id)
        assert pickup_reads.count == 1  # the lock was gone: the step read the fence
        assert not local.locks.is_held(ref.slug)  # and did not take the lock back
        assert runs(local, ref)["reserve_slot"][0] != "completed"
    finally:
        local.faults.clear(plan.id)


def test_a_lock_lost_with_redis_sends_the_step_the_long_way_and_it_takes_the_lock_back(
    local: Container, dispatcher: RecordingDispatcher, pickup_reads: PickupReads
) -> None:
    ref = started(local, dispatcher)
    tenant = dispatcher.tenants[ref.attempt_id]
    local.locks.force_release(ref.slug)  # what a Redis restart does to it; the DB is unchanged

    done = local.runner.run_step(ref, "validate", first_delivery=True, tenant=tenant)

    assert isinstance(done, StepDone)
    assert pickup_reads.count == 1
    assert local.locks.info(ref.slug).run_id == ref.attempt_id
    local.runner.run_step(ref, "reserve_slot", first_delivery=True, tenant=tenant)
    assert pickup_reads.count == 1  # the next step finds its lock again
    assert runs(local, ref)["reserve_slot"] == ("completed", 1)


def test_a_duplicate_of_a_step_that_failed_for_good_leaves_the_failure_standing(
    local: Container, dispatcher: RecordingDispatcher
) -> None:
    """A step's message delivered twice, the second copy after the first failed the step for
    good but before the errback ended the attempt (the lock is still the attempt's)."""
    ref = started(local, dispatcher)
    tenant = dispatcher.tenants[ref.attempt_id]
    local.runner.run_step(ref, "validate", first_delivery=True, tenant=tenant)
    local.faults.add("reserve_slot", mode=FaultMode.FATAL, tenant=ref.slug, times=1)
    with pytest.raises(StepFailedForGood):
        local.runner.run_step(ref, "reserve_slot", first_delivery=True, tenant=tenant)
    before = events(local, ref)

    # The copy's provider succeeds this time; the step stays failed all the same.
    with pytest.raises(StepFailedForGood) as again:
        local.runner.run_step(ref, "reserve_slot", first_delivery=True, tenant=tenant)

    assert again.value.tries == 1
    assert runs(local, ref)["reserve_slot"] == ("failed", 1)
    assert "provision_storage" not in runs(local, ref)
    assert events(local, ref) == before


def test_a_duplicate_counts_the_tries_the_row_has_not_its_own(
    local: Container, dispatcher: RecordingDispatcher
) -> None:
    """A copy of the step's first message, run after the automatic retries have spent every
    try: its failure is the step's last, not a first one to retry."""
    ref = started(local, dispatcher)
    tenant = dispatcher.tenants[ref.attempt_id]
    local.runner.run_step(ref, "validate", first_delivery=True, tenant=tenant)
    tries = local.settings.step_tries
    local.faults.add("reserve_slot", mode=FaultMode.ERROR, tenant=ref.slug, times=tries + 1)
    outcome = local.runner.run_step(ref, "reserve_slot", first_delivery=True, tenant=tenant)
    assert isinstance(outcome, RetryLater)
    for _ in range(tries - 2):
        assert isinstance(local.runner.run_step(ref, "reserve_slot"), RetryLater)
    with pytest.raises(StepFailedForGood):
        local.runner.run_step(ref, "reserve_slot")
    before = events(local, ref)

    with pytest.raises(StepFailedForGood) as duplicate:
        local.runner.run_step(ref, "reserve_slot", first_delivery=True, tenant=tenant)

    assert duplicate.value.tries == tries
    assert runs(local, ref)["reserve_slot"] == ("failed", tries)
    assert events(local, ref) == before  # no `step_retrying` for a step out of tries


@pytest.mark.parametrize("first_ends", ["completed", "failed"])
def test_a_duplicate_whose_provider_fails_after_the_step_ended_writes_nothing(
    local: Container, dispatcher: RecordingDispatcher, first_ends: str
) -> None:
    """Two copies of a step's message: the first ends the step (completes it, or fails it for
    good); the second, run after, meets a transient error. The first copy's outcome stands."""
    ref = started(local, dispatcher)
    tenant = dispatcher.tenants[ref.attempt_id]
    local.runner.run_step(ref, "validate", first_delivery=True, tenant=tenant)
    if first_ends == "failed":
        local.faults.add("reserve_slot", mode=FaultMode.FATAL, tenant=ref.slug, times=1)
    try:
        first = local.runner.run_step(ref, "reserve_slot", first_delivery=True, tenant=tenant)
    except StepFailedForGood:
        first = None
    before_runs, before_events = runs(local, ref), events(local, ref)
    local.faults.add("reserve_slot", mode=FaultMode.ERROR, tenant=ref.slug, times=1)

    if first_ends == "completed":
        again = local.runner.run_step(ref, "reserve_slot", first_delivery=True, tenant=tenant)
        assert again == first
    else:
        with pytest.raises(StepFailedForGood) as again_failed:
            local.runner.run_step(ref, "reserve_slot", first_delivery=True, tenant=tenant)
        assert again_failed.value.error_type == "FatalUpstreamError"

    assert runs(local, ref) == before_runs
    assert events(local, ref) == before_events  # no `step_retrying`
