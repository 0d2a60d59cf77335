"""Fault plans in Redis, so that every worker process honours them (contract: Fault plans).

A plan is one hash field: ``id -> {"id", "step", "tenant", "mode", "times", "created_at"}``.
Matching and spending a plan is one Lua script, so two workers never spend the same try.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, cast

from redis import Redis
from redis.client import Pipeline

from config.keys import FAULT_PLANS_KEY, HANG_LIMIT_S, HANG_POLL_S
from sagas.errors import FatalUpstreamError, TransientUpstreamError
from sagas.steps import STEPS


class FaultMode(StrEnum):
    ERROR = "error"
    FATAL = "fatal"
    HANG = "hang"


@dataclass(frozen=True, slots=True)
class FaultPlan:
    id: str
    step: str
    tenant: str | None
    mode: FaultMode
    times: int | None  # tries left to spend; None = until cleared
    created_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> FaultPlan:
        data = json.loads(raw)
        return cls(
            id=data["id"],
            step=data["step"],
            tenant=data.get("tenant"),
            mode=FaultMode(data["mode"]),
            times=data.get("times"),
            created_at=float(data.get("created_at", 0)),
        )


# Pick the matching plan (a tenant's own plan before a plan for any tenant), spend one try of
# it, and return it as it was before spending (nil: none). A spent `hang` plan stays, with times
# 0, until the hang it caused ends, so that clearing it is what wakes the step. A Lua function,
# so that the step's preflight script can call it too (service/preflight.py).
TAKE_PLAN_FUNCTION = """
local function take_plan(key, step, tenant)
  local best, best_raw = nil, nil
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local plan = cjson.decode(fields[i + 1])
    local times = plan['times']
    local live = (times == nil or times == cjson.null or times > 0)
    if live and plan['step'] == step then
      local owner = plan['tenant']
      if owner == tenant then
        if best == nil or best['tenant'] ~= tenant or plan['created_at'] < best['created_at'] then
          best, best_raw = plan, fields[i + 1]
        end
      elseif (owner == nil or owner == cjson.null)
          and (best == nil or best['tenant'] ~= tenant) then
        if best == nil or plan['created_at'] < best['created_at'] then
          best, best_raw = plan, fields[i + 1]
        end
      end
    end
  end
  if best == nil then return nil end
  local times = best['times']
  if times ~= nil and times ~= cjson.null then
    if times <= 1 and best['mode'] ~= 'hang' then
      redis.call('HDEL', key, best['id'])
    else
      best['times'] = times - 1
      redis.call('HSET', key, best['id'], cjson.encode(best))
    end
  end
  return best_raw
end
"""
_CONSUME = TAKE_PLAN_FUNCTION + "return take_plan(KEYS[1], ARGV[1], ARGV[2])\n"


class FaultPlans:
    def __init__(self, redis: Redis, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self._consume = redis.register_script(_CONSUME)
        self._clock = clock

    def add(
        self, step: str, *, mode: FaultMode, tenant: str | None = None, times: int | None = None
    ) -> FaultPlan:
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; steps are {', '.join(STEPS)}")
        if times is not None and times < 1:
            raise ValueError("--times must be at least 1")
        plan = FaultPlan(
            id=uuid.uuid4().hex[:12],
            step=step,
            tenant=tenant,
            mode=FaultMode(mode),
            times=times,
            created_at=time.time(),
        )
        self._redis.hset(FAULT_PLANS_KEY, plan.id, plan.to_json())
        return plan

    def list(self) -> list[FaultPlan]:
        raw = cast(dict[bytes, bytes], self._redis.hgetall(FAULT_PLANS_KEY))
        return sorted((FaultPlan.from_json(v) for v in raw.values()), key=lambda p: p.created_at)

    def clear(self, plan_id: str | None = None) -> int:
        if plan_id is None:
            plans = len(self.list())
            self._redis.delete(FAULT_PLANS_KEY)
            return plans
        return int(cast(Any, self._redis.hdel(FAULT_PLANS_KEY, plan_id)))

    def exists(self, plan_id: str) -> bool:
        return bool(self._redis.hexists(FAULT_PLANS_KEY, plan_id))

    def take(self, step: str, tenant: str) -> FaultPlan | None:
        raw = self._consume(keys=[FAULT_PLANS_KEY], args=[step, tenant])
        return FaultPlan.from_json(cast(bytes, raw)) if raw else None

    @property
    def client(self) -> Redis:
        return self._redis

    def queue_take(self, pipe: Pipeline, step: str, tenant: str) -> None:
        """``take``'s script, queued on a (non-transactional) pipeline; ``taken`` reads its
        answer. A NOSCRIPT answer means it did not run: the caller calls ``take`` instead."""
        pipe.evalsha(self._consume.sha, 1, FAULT_PLANS_KEY, step, tenant)

    @staticmethod
    def taken(answer: object) -> FaultPlan | None:
        return FaultPlan.from_json(cast(bytes, answer)) if answer else None

    def apply(self, step: str, tenant: str, *, while_hanging: Callable[[], None]) -> bool:
        """Raise or block as the matching plan says; do nothing when no plan matches. True when
        the step was held by a hang (the world may have moved on meanwhile).

        ``while_hanging`` runs at every poll of a hang (the step renews its lock there), so a
        stuck step looks stuck, not dead, until an operator resets it.
        """
        return self.enact(self.take(step, tenant), step, while_hanging=while_hanging)

    def enact(
        self, plan: FaultPlan | None, step: str, *, while_hanging: Callable[[], None]
    ) -> bool:
        """``apply`` for a plan already taken."""
        if plan is None:
            return False
        if plan.mode is FaultMode.ERROR:
            raise TransientUpstreamError(f"injected fault: {step} upstream unavailable")
        if plan.mode is FaultMode.FATAL:
            raise FatalUpstreamError(f"injected fault: {step} upstream refused the request")
        self._hang(plan, while_hanging)
        return True

    def _hang(self, plan: FaultPlan, while_hanging: Callable[[], None]) -> None:
        deadline = self._clock() + HANG_LIMIT_S
        while self._clock() < deadline and self.exists(plan.id):
            while_hanging()
            time.sleep(HANG_POLL_S)
        if self._clock() >= deadline:
            # The hang ran its course: a plan spent down to 0 has no more use.
            current = self._redis.hget(FAULT_PLANS_KEY, plan.id)
            if current is not None and FaultPlan.from_json(cast(bytes, current)).times == 0:
                self._redis.hdel(FAULT_PLANS_KEY, plan.id)
