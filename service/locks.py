"""The per-tenant Redis lock: a fast guard in front of the DB epoch, which is what fences.

Token = ``{run_id}:{epoch}:{acquired_at_ms}``, so ``provisioner lock`` can say who holds it,
for which epoch, and since when.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import structlog
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from config.keys import LOCK_TTL_MS, lock_key

log = structlog.get_logger(__name__)

# Extend only our own lock. With ARGV[3] == "1", also take it back if it vanished (a Redis
# restart, an expired TTL): only a step that has just passed its DB fence check may do that,
# since the DB epoch, not this key, decides who may write.
_EXTEND = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not current and ARGV[3] == '1' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class LockToken:
    run_id: str
    epoch: int
    acquired_at_ms: int

    def encode(self) -> str:
        return f"{self.run_id}:{self.epoch}:{self.acquired_at_ms}"

    @classmethod
    def decode(cls, raw: str) -> LockToken | None:
        parts = raw.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            return None
        return cls(parts[0], int(parts[1]), int(parts[2]))

    @classmethod
    def new(cls, run_id: str, epoch: int) -> LockToken:
        return cls(run_id, epoch, int(time.time() * 1000))


@dataclass(frozen=True, slots=True)
class LockInfo:
    slug: str
    held: bool
    token: str | None
    run_id: str | None
    epoch: int | None
    age_s: float | None
    ttl_s: float | None


class TenantLocks:
    def __init__(self, redis: Redis, ttl_ms: int = LOCK_TTL_MS) -> None:
        self._redis = redis
        self._ttl_ms = ttl_ms
        self._extend = redis.register_script(_EXTEND)
        self._release = redis.register_script(_RELEASE)

    @property
    def client(self) -> Redis:
        return self._redis

    @property
    def ttl_ms(self) -> int:
        return self._ttl_ms

    def queue_retake(self, pipe: Pipeline, slug: str, token: LockToken) -> None:
        """``retake_after_fence_check``'s script, queued on a pipeline (read its answer with
        ``retaken``); the pipeline must not be transactional: a NOSCRIPT answer (a Redis that
        restarted) means the script did not run, and the caller runs it again by itself."""
        pipe.evalsha(self._extend.sha, 1, lock_key(slug), token.encode(), self._ttl_ms, "1")

    @staticmethod
    def retaken(answer: object) -> bool:
        return int(cast(Any, answer)) != 0

    def acquire(self, slug: str, token: LockToken) -> bool:
        return bool(self._redis.set(lock_key(slug), token.encode(), nx=True, px=self._ttl_ms))

    def extend(self, slug: str, token: LockToken, *, retake: bool = False) -> bool:
        """Renew our lock; with ``retake``, take it back if it vanished. False when it is not
        ours (someone else's, or gone and not retaken)."""
        args: list[str | int] = [token.encode(), self._ttl_ms, "1" if retake else "0"]
        result = self._extend(keys=[lock_key(slug)], args=args)
        return int(cast(Any, result)) != 0

    def retake_after_fence_check(self, slug: str, token: LockToken) -> bool:
        """A run's step, just past its DB fence check: renew or retake the lock. The lock only
        guards; if Redis does not answer right now, the fence has decided, so go on (True)."""
        try:
            return self.extend(slug, token, retake=True)
        except RedisError as exc:
            log.warning("lock.unreachable", slug=slug, error=str(exc)[:200])
            return True

    def release_after_commit(self, slug: str, token: LockToken) -> None:
        """Give the lock back once the run's end is committed. A Redis that does not answer must
        not undo what is done: the lock was lost with it, or lapses by its TTL."""
        try:
            self.release(slug, token)
        except RedisError as exc:
            log.warning("lock.release_failed", slug=slug, error=str(exc)[:200])

    def release(self, slug: str, token: LockToken) -> bool:
        result = self._release(keys=[lock_key(slug)], args=[token.encode()])
        return int(cast(Any, result)) == 1

    def force_release(self, slug: str) -> bool:
        return int(cast(Any, self._redis.delete(lock_key(slug)))) == 1

    def is_held(self, slug: str) -> bool:
        return int(cast(Any, self._redis.exists(lock_key(slug)))) == 1

    def info(self, slug: str) -> LockInfo:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(lock_key(slug))
        pipe.pttl(lock_key(slug))
        raw, pttl = pipe.execute()
        if raw is None:
            return LockInfo(slug, False, None, None, None, None, None)
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        token = LockToken.decode(text)
        age = (time.time() * 1000 - token.acquired_at_ms) / 1000 if token else None
        return LockInfo(
            slug=slug,
            held=True,
            token=text,
            run_id=token.run_id if token else None,
            epoch=token.epoch if token else None,
            age_s=round(age, 3) if age is not None else None,
            ttl_s=round(pttl / 1000, 3) if pttl and pttl > 0 else None,
        )
