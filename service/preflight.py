"""The Redis round trip before a step's provider, in one: renew (or retake) the tenant's lock
and take the step's matching fault plan, pipelined (two scripts, one round trip).

Each keeps its own failure rule: the lock only guards, so a lock that cannot be renewed is
logged and the step goes on (the DB fence decides); a fault plan that cannot be read fails the
try, as before.
"""

from __future__ import annotations

import structlog
from redis.exceptions import NoScriptError, RedisError

from service.faults import FaultPlan, FaultPlans
from service.locks import LockToken, TenantLocks

log = structlog.get_logger(__name__)


class StepPreflight:
    def __init__(self, locks: TenantLocks, faults: FaultPlans) -> None:
        self._locks = locks
        self._faults = faults
        # Both on one Redis client (bootstrap): otherwise, one call each.
        self._pipelined = locks.client is faults.client

    def run(self, slug: str, step: str, token: LockToken | None) -> FaultPlan | None:
        """Renew the lock (just past the step's fence check) and take the fault plan."""
        if not self._pipelined:
            self._retake(slug, token)
            return self._faults.take(step, slug)
        pipe = self._locks.client.pipeline(transaction=False)
        if token is not None:
            self._locks.queue_retake(pipe, slug, token)
        self._faults.queue_take(pipe, step, slug)
        try:
            answers = pipe.execute(raise_on_error=False)
        except RedisError as exc:
            log.warning("lock.unreachable", slug=slug, error=str(exc)[:200])
            raise
        if any(isinstance(answer, NoScriptError) for answer in answers):
            # A Redis that restarted has no scripts: neither ran. Each call loads its own.
            self._retake(slug, token)
            return self._faults.take(step, slug)
        plan_answer = answers[-1]
        if token is not None:
            lock_answer = answers[0]
            if isinstance(lock_answer, Exception):
                log.warning("lock.unreachable", slug=slug, error=str(lock_answer)[:200])
            elif not self._locks.retaken(lock_answer):
                log.warning("lock.held_by_other", slug=slug)
        if isinstance(plan_answer, Exception):
            raise plan_answer
        return self._faults.taken(plan_answer)

    def _retake(self, slug: str, token: LockToken | None) -> None:
        if token is not None and not self._locks.retake_after_fence_check(slug, token):
            log.warning("lock.held_by_other", slug=slug)
