"""The Redis pieces on real Redis: the fenced lock's scripts and fault plans' spending."""

from __future__ import annotations

import threading
import time

import pytest

from sagas.errors import FatalUpstreamError, TransientUpstreamError
from service.bootstrap import Container
from service.faults import FaultMode, FaultPlans
from service.locks import LockToken, TenantLocks
from tests.support.events import new_slug

pytestmark = pytest.mark.integration


def test_a_second_start_while_held_is_refused(services: Container) -> None:
    locks, slug = services.locks, new_slug("lock")
    first, second = LockToken.new("a1", 1), LockToken.new("a2", 2)
    assert locks.acquire(slug, first)
    assert not locks.acquire(slug, second)
    info = locks.info(slug)
    assert (info.run_id, info.epoch) == ("a1", 1)
    assert info.ttl_s is not None
    assert info.ttl_s > 0
    assert not locks.release(slug, second)  # never someone else's
    assert locks.release(slug, first)
    assert not locks.is_held(slug)


def test_extend_renews_only_its_own_lock_and_retakes_a_vanished_one(services: Container) -> None:
    locks = TenantLocks(services.redis, ttl_ms=500)
    slug = new_slug("extend")
    mine, theirs = LockToken.new("mine", 1), LockToken.new("theirs", 2)
    assert locks.acquire(slug, mine)
    time.sleep(0.3)
    assert locks.extend(slug, mine)
    assert locks.info(slug).ttl_s > 0.4  # type: ignore[operator]
    locks.force_release(slug)  # as after a Redis restart, or a reset
    assert not locks.extend(slug, mine)  # a plain renewal never takes a lock back
    assert not locks.is_held(slug)
    assert locks.extend(slug, mine, retake=True)  # a step just past its fence check may
    assert locks.info(slug).run_id == "mine"
    locks.force_release(slug)
    assert locks.acquire(slug, theirs)
    assert not locks.extend(slug, mine, retake=True)
    assert locks.info(slug).run_id == "theirs"


def test_fault_plans_are_spent_try_by_try_and_tenant_plans_come_first(
    services: Container,
) -> None:
    faults = FaultPlans(services.redis)
    slug, other = new_slug("f"), new_slug("g")
    faults.add("issue_certificate", mode=FaultMode.FATAL)  # any tenant, until cleared
    faults.add("issue_certificate", mode=FaultMode.ERROR, tenant=slug, times=2)
    try:
        for _ in range(2):
            with pytest.raises(TransientUpstreamError):
                faults.apply("issue_certificate", slug, while_hanging=lambda: None)
        with pytest.raises(FatalUpstreamError):
            faults.apply("issue_certificate", slug, while_hanging=lambda: None)
        with pytest.raises(FatalUpstreamError):
            faults.apply("issue_certificate", other, while_hanging=lambda: None)
        faults.apply("provision_storage", slug, while_hanging=lambda: None)  # no plan: no-op
        assert [p.mode for p in faults.list() if p.step == "issue_certificate"] == ["fatal"]
    finally:
        faults.clear()


def test_two_workers_never_spend_the_same_try(services: Container) -> None:
    faults = FaultPlans(services.redis)
    slug = new_slug("spend")
    faults.add("activate", mode=FaultMode.ERROR, tenant=slug, times=25)
    failures = []

    def spend() -> None:
        for _ in range(20):
            try:
                faults.apply("activate", slug, while_hanging=lambda: None)
            except TransientUpstreamError:
                failures.append(1)

    threads = [threading.Thread(target=spend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(failures) == 25
    assert not faults.list()


def test_hang_blocks_until_cleared_and_keeps_the_lock_alive(services: Container) -> None:
    faults = FaultPlans(services.redis)
    slug = new_slug("hang")
    plan = faults.add("register_workflows", mode=FaultMode.HANG, tenant=slug)
    beats: list[float] = []
    done = threading.Event()

    def run() -> None:
        faults.apply("register_workflows", slug, while_hanging=lambda: beats.append(time.time()))
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    assert not done.is_set()
    assert len(beats) >= 2
    # another tenant's step is not blocked by this hang
    faults.apply("register_workflows", new_slug("other"), while_hanging=lambda: None)
    faults.clear(plan.id)
    assert done.wait(5)
    thread.join()
