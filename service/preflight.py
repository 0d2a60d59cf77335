"""The Redis round trip before a step's provider: renew (or retake) the tenant's lock and take
the step's matching fault plan, in one round trip.

Two ways in:

- ``confirm``: a step's first delivery, with its tenant in the message. One script: if the lock
  is still this attempt's, renew it and take the fault plan; if not, change nothing. A lock that
  is still the attempt's says that no reset or newer attempt has come since (a reset deletes the
  lock, a new attempt takes it with a token of its own), so the step may skip the database's
  pick-up read (service/saga_runner.py). Anything else, or a Redis that does not answer, sends
  the step the long way.
- ``run``: the long way, just past the step's fence check in the database: renew or retake the
  lock, and take the fault plan, pipelined (two scripts, one round trip).

Each keeps its own failure rule: the lock only guards, so a lock that cannot be renewed is
logged and the step goes on (the DB fence decides); a fault plan that cannot be read fails the
try, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import structlog
from redis.exceptions import NoScriptError, RedisError

from config.keys import FAULT_PLANS_KEY, lock_key
from service.faults import TAKE_PLAN_FUNCTION, FaultPlan, FaultPlans
from service.locks import LockToken, TenantLocks

log = structlog.get_logger(__name__)

# KEYS: the tenant's lock, the fault plans. ARGV: the attempt's token prefix ("<attempt id>:"),
# the lock's TTL in ms, the step, the slug. Nil when the lock is not the attempt's (gone, or
# another's); else {the lock's token, the plan taken (left out when none)}.
_CONFIRM = (
    TAKE_PLAN_FUNCTION
    + """
local current = redis.call('GET', KEYS[1])
if not current or string.sub(current, 1, string.len(ARGV[1])) ~= ARGV[1] then
  return nil
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {current, take_plan(KEYS[2], ARGV[3], ARGV[4])}
"""
)


@dataclass(frozen=True, slots=True)
class Confirmed:
    """The attempt's lock, renewed, and the fault plan taken for the step (None: none)."""

    token: LockToken
    plan: FaultPlan | None


class StepPreflight:
    def __init__(self, locks: TenantLocks, faults: FaultPlans) -> None:
        self._locks = locks
        self._faults = faults
        # Both on one Redis client (bootstrap): otherwise, one call each, and no confirming.
        self._pipelined = locks.client is faults.client
        self._confirm = locks.client.register_script(_CONFIRM)

    def confirm(self, slug: str, attempt_id: str, step: str) -> Confirmed | None:
        """Renew the lock and take the fault plan if the lock is still this attempt's; None,
        with nothing changed, when it is not or Redis cannot say."""
        if not self._pipelined:
            return None
        keys = [lock_key(slug), FAULT_PLANS_KEY]
        args: list[str | int] = [f"{attempt_id}:", self._locks.ttl_ms, step, slug]
        try:
            answer = cast(Any, self._confirm(keys=keys, args=args))
        except RedisError as exc:
            # The long way reads the database first, then tries Redis again (and fails the try
            # if the fault plan still cannot be read).
            log.warning("lock.unreachable", slug=slug, error=str(exc)[:200])
            return None
        if not answer:
            return None
        raw = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
        token = LockToken.decode(raw)
        if token is None:
            return None
        return Confirmed(token, self._faults.taken(answer[1] if len(answer) > 1 else None))

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
