"""A lock whose TTL runs out while its step still runs (a long hang).

The TTL is the worker's (``LOCK_TTL_MS``, two minutes): the test makes the key vanish the way
expiry does, rather than waiting. Then: the hung step renews but never retakes it; a retry is
still refused (the tenant is provisioning, whatever Redis says); the operator resets and retries;
the new attempt runs; the old step wakes up in the middle of it, and writes nothing.
"""

from __future__ import annotations

import time

import pytest

from config.keys import lock_key
from sagas.messages import CommandType
from sagas.states import AttemptState
from service.bootstrap import Container
from service.faults import FaultMode
from service.handlers import Request
from service.locks import LockToken
from service.saga_runner import LOCK_RENEW_EVERY_S
from tests.support.events import EventTap, data_of, new_slug
from tests.support.outcome import attempt_ids, outcomes, step_runs
from tests.support.processes import logged
from tests.support.stack import wait_until
from tests.support.workers import WorkerGroup

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]


def hanging_in(tap: EventTap, slug: str, step: str, attempt: int) -> bool:
    return any(
        d["step"] == step and d["attempt_number"] == attempt
        for d in data_of(tap.of(slug), "tenant.provisioning.step_started")
    )


def test_an_expired_lock_never_lets_the_old_attempt_finish_behind_a_new_one(
    services: Container, worker: WorkerGroup, tap: EventTap
) -> None:
    slug = new_slug("ttl")
    old_hang = services.faults.add("provision_storage", mode=FaultMode.HANG, tenant=slug, times=1)
    new_hang = None
    try:
        assert services.handlers.create(Request(CommandType.PROVISION, slug), plan="pro").accepted
        wait_until(lambda: hanging_in(tap, slug, "provision_storage", 1), 30, "the hang")
        time.sleep(1.0)
        held = services.locks.info(slug)
        assert held.held

        # The TTL runs out while the step still hangs: the key is gone, as at expiry.
        services.redis.delete(lock_key(slug))
        # The hung step keeps renewing, but renewing is not retaking: the lock stays gone.
        time.sleep(LOCK_RENEW_EVERY_S + 1.5)
        assert not services.locks.is_held(slug)

        # A vanished lock is no licence for a second attempt: the tenant is provisioning.
        refused = services.handlers.retry(Request(CommandType.RETRY, slug))
        assert not refused.accepted
        assert refused.reason == "not_failed"
        assert len(outcomes(services.engine, [slug])[slug].attempts) == 1

        # The operator's way: reset (fences attempt 1), retry (attempt 2, which hangs later on).
        old_attempt = attempt_ids(services.engine, slug, AttemptState.RUNNING)
        new_hang = services.faults.add("check_readiness", mode=FaultMode.HANG, tenant=slug, times=1)
        assert services.handlers.reset(Request(CommandType.RESET, slug)).accepted
        retried = services.handlers.retry(Request(CommandType.RETRY, slug))
        assert retried.accepted, retried.message
        assert retried.attempt_number == 2
        wait_until(lambda: hanging_in(tap, slug, "check_readiness", 2), 30, "attempt 2")
        new_token = LockToken.decode(services.locks.info(slug).token or "")
        assert new_token is not None
        assert new_token.run_id != old_attempt[0]
        before = step_runs(services.engine, old_attempt)
        events_before = len(tap.of(slug))

        # The old step wakes up while attempt 2 runs: fenced, it writes and emits nothing, and
        # leaves attempt 2's lock alone.
        services.faults.clear(old_hang.id)
        wait_until(
            lambda: logged(worker.log_text(), "step.fenced", slug),
            30,
            "the old step to wake and find itself fenced",
        )
        assert step_runs(services.engine, old_attempt) == before
        assert services.locks.info(slug).token == new_token.encode()
        late = [e for e in tap.of(slug)[events_before:] if e["data"].get("attempt_number") == 1]
        assert late == []

        services.faults.clear(new_hang.id)
        tap.wait_for_type(slug, "tenant.provisioning.completed", timeout=60)
        final = outcomes(services.engine, [slug])[slug]
        assert final.attempts == [(1, "reset"), (2, "succeeded")]
        assert final.state == "active"
        wait_until(lambda: not services.locks.is_held(slug), 10, "the lock to be released")
    finally:
        services.faults.clear(old_hang.id)
        if new_hang is not None:
            services.faults.clear(new_hang.id)
