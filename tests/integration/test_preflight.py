"""Issue 6: a step's lock renewal and fault-plan take, in one pipelined round trip, answer as the
two calls did, also on a Redis that lost its scripts (a restart)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from config.keys import lock_key
from service.bootstrap import Container
from service.faults import FaultMode, FaultPlans
from service.locks import LockToken, TenantLocks
from service.preflight import StepPreflight
from tests.support.events import new_slug
from tests.support.private_redis import PrivateRedis

pytestmark = pytest.mark.integration


@pytest.fixture(params=[False, True], ids=["scripts-loaded", "scripts-lost"])
def redis_of_test(
    request: pytest.FixtureRequest, services: Container, workdir: Path
) -> Iterator[tuple[Redis, bool]]:
    """The session's Redis, or, to lose the scripts, a redis-server of the test's own: SCRIPT
    FLUSH is server-wide, and the machine's Redis serves other sessions."""
    if not request.param:
        yield services.redis, False
        return
    private = PrivateRedis(workdir, "preflight-redis").start()
    try:
        yield Redis.from_url(private.url(0)), True
    finally:
        private.stop()


def test_the_lock_is_renewed_or_retaken_and_the_plan_spent_in_one_round_trip(
    redis_of_test: tuple[Redis, bool],
) -> None:
    redis, scripts_lost = redis_of_test
    locks, faults = TenantLocks(redis), FaultPlans(redis)
    preflight = StepPreflight(locks, faults)
    slug = new_slug("preflight")
    token = LockToken.new("run", 1)
    plan = faults.add("provision_storage", mode=FaultMode.ERROR, tenant=slug, times=1)
    try:
        if scripts_lost:
            redis.script_flush()  # what a restart does; each script loads again
        # The lock vanished (a restart, a lapsed TTL): a step just past its fence retakes it.
        taken = preflight.run(slug, "provision_storage", token)
        assert taken is not None
        assert taken.id == plan.id
        assert locks.info(slug).run_id == "run"
        assert not faults.exists(plan.id)  # its one try is spent
        assert preflight.run(slug, "provision_storage", token) is None
        assert preflight.run(slug, "validate", None) is None  # no lock to renew: plans only
    finally:
        locks.force_release(slug)
        faults.clear(plan.id)


def test_someone_elses_lock_is_left_alone(services: Container) -> None:
    locks, faults = TenantLocks(services.redis), FaultPlans(services.redis)
    slug = new_slug("preflight")
    theirs = LockToken.new("theirs", 2)
    assert locks.acquire(slug, theirs)
    try:
        assert StepPreflight(locks, faults).run(slug, "validate", LockToken.new("mine", 1)) is None
        assert locks.info(slug).run_id == "theirs"
    finally:
        locks.force_release(slug)


def test_the_attempts_own_lock_is_confirmed_renewed_and_the_plan_spent_in_one_script(
    redis_of_test: tuple[Redis, bool],
) -> None:
    redis, scripts_lost = redis_of_test
    locks, faults = TenantLocks(redis, ttl_ms=60_000), FaultPlans(redis)
    preflight = StepPreflight(locks, faults)
    slug = new_slug("confirm")
    token = LockToken.new("attempt-1", 3)
    plan = faults.add("provision_storage", mode=FaultMode.ERROR, tenant=slug, times=1)
    assert locks.acquire(slug, token)
    try:
        redis.pexpire(lock_key(slug), 1_000)  # about to lapse: renewed below
        if scripts_lost:
            redis.script_flush()
        confirmed = preflight.confirm(slug, "attempt-1", "provision_storage")
        assert confirmed is not None
        assert confirmed.token == token
        assert confirmed.plan is not None
        assert confirmed.plan.id == plan.id
        assert not faults.exists(plan.id)  # its one try is spent
        ttl_s = locks.info(slug).ttl_s
        assert ttl_s is not None
        assert ttl_s > 50  # renewed to the lock's full TTL
        again = preflight.confirm(slug, "attempt-1", "provision_storage")
        assert again is not None
        assert again.plan is None
    finally:
        locks.force_release(slug)
        faults.clear(plan.id)


@pytest.mark.parametrize("holder", [None, "attempt-2", "attempt-10"])
def test_a_lock_that_is_not_the_attempts_is_not_confirmed_and_nothing_changes(
    services: Container, holder: str | None
) -> None:
    """Gone (a reset, a Redis restart) or another attempt's: the step must read the database,
    and neither the lock nor the plans may change before it has."""
    redis = services.redis
    locks, faults = TenantLocks(redis), FaultPlans(redis)
    slug = new_slug("confirm")
    theirs = LockToken.new(holder, 2) if holder else None
    plan = faults.add("validate", mode=FaultMode.ERROR, tenant=slug, times=1)
    if theirs is not None:
        assert locks.acquire(slug, theirs)
    try:
        # "attempt-1" is a prefix of "attempt-10": the token's separator must be matched too.
        assert StepPreflight(locks, faults).confirm(slug, "attempt-1", "validate") is None
        assert faults.exists(plan.id)
        assert locks.info(slug).token == (theirs.encode() if theirs else None)
    finally:
        locks.force_release(slug)
        faults.clear(plan.id)
