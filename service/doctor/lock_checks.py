"""The doctor's lock checks: locks of tenants that run nothing, and runs nobody runs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime

from redis import Redis
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from config.keys import LOCK_PREFIX, LOCK_TTL_MS
from sagas.states import TenantState
from service.db.models import Attempt, Decommission, StepRun, Tenant
from service.doctor.findings import Finding, age_s, aware, describe, text_of
from service.locks import LockToken

# A run nobody has touched for this long, with no lock holder, has lost its worker.
STALLED_AFTER_S = LOCK_TTL_MS / 1000
# A lock that looks stale is read again after this pause: a run that just ended releases its lock
# right after its commit, and must not be reported for that instant.
LOCK_RECHECK_S = 0.5


class LockChecks:
    def __init__(
        self,
        engine: Engine,
        redis: Redis,
        *,
        now: Callable[[], datetime],
        sleep: Callable[[float], None],
    ) -> None:
        self._engine = engine
        self._redis = redis
        self._now = now
        self._sleep = sleep

    def locks(self) -> Iterator[Finding]:
        try:
            held = self._held_locks()
            findings = self._stale_locks(held)
            findings.extend(self._stalled_runs(set(held)))
        except Exception as exc:
            yield Finding(
                "locks",
                False,
                f"cannot check: {describe(exc)}",
                "see `redis` and `database`",
            )
            return
        yield Finding("locks", not findings, f"{len(held)} held, {len(findings)} problem(s)")
        yield from findings

    def _held_locks(self) -> dict[str, str]:
        held: dict[str, str] = {}
        for key in self._redis.scan_iter(match=f"{LOCK_PREFIX}*", count=500):
            raw = self._redis.get(key)
            if raw is not None:
                name = text_of(key)
                held[name[len(LOCK_PREFIX) :]] = text_of(raw)
        return held

    def _stale_locks(self, held: dict[str, str]) -> list[Finding]:
        """Locks of tenants that run nothing: not provisioning, not decommissioning, or gone."""
        suspects: dict[str, Tenant | None] = {}
        with Session(self._engine) as session:
            for slug in sorted(held):
                tenant = session.exec(select(Tenant).where(Tenant.live_slug == slug)).first()
                if tenant is None or tenant.state not in (
                    TenantState.PROVISIONING,
                    TenantState.DECOMMISSIONING,
                ):
                    suspects[slug] = tenant
        if not suspects:
            return []
        self._sleep(LOCK_RECHECK_S)
        findings: list[Finding] = []
        for slug, tenant in suspects.items():
            current = self._redis.get(f"{LOCK_PREFIX}{slug}")
            if current is None or text_of(current) != held[slug]:
                continue  # released, or taken by a new run, meanwhile
            findings.append(self._stale_lock(slug, held[slug], tenant))
        return findings

    @staticmethod
    def _stale_lock(slug: str, raw: str, tenant: Tenant | None) -> Finding:
        token = LockToken.decode(raw)
        age = round(time.time() - token.acquired_at_ms / 1000, 1) if token else None
        state = tenant.state if tenant is not None else None
        details = {"slug": slug, "token": raw, "tenant_state": state, "age_s": age}
        if tenant is None:
            return Finding(
                f"lock {slug}",
                False,
                f"stale lock on {slug} (no live tenant of that slug)",
                f"`provisioner reset {slug}` refuses an unknown slug; delete the key: "
                f"`redis-cli -u $PROVISIONER_REDIS_URL DEL {LOCK_PREFIX}{slug}`",
                details,
            )
        return Finding(
            f"lock {slug}",
            False,
            f"stale lock on {slug} (tenant {state}): a retry or decommission would be refused "
            "`locked`",
            f"run `provisioner reset {slug}`",
            details,
        )

    def _stalled_runs(self, locked: set[str]) -> list[Finding]:
        now = self._now()
        found: list[Finding] = []
        with Session(self._engine) as session:
            busy = session.exec(
                select(Tenant).where(
                    col(Tenant.state).in_([TenantState.PROVISIONING, TenantState.DECOMMISSIONING])
                )
            ).all()
            for tenant in busy:
                if tenant.slug in locked:
                    continue
                last = self._last_activity(session, tenant)
                age = age_s(last, now)
                if age is None or age < STALLED_AFTER_S:
                    continue
                details = {"slug": tenant.slug, "state": tenant.state, "idle_s": age}
                if tenant.state == TenantState.PROVISIONING:
                    fix = (
                        f"if no worker is still on it: `provisioner reset {tenant.slug}`, then "
                        f"`provisioner retry {tenant.slug}` (the reset fences the old attempt)"
                    )
                else:
                    fix = (
                        f"run `provisioner decommission {tenant.slug}` again (it fences the "
                        "stalled run and goes on)"
                    )
                found.append(
                    Finding(
                        f"run {tenant.slug}",
                        False,
                        f"{tenant.slug} is {tenant.state} with no lock holder and no progress for "
                        f"{age:.0f}s: its worker may have died (on the Redis broker its step comes "
                        "back only after the visibility timeout)",
                        fix,
                        details,
                    )
                )
        return found

    @staticmethod
    def _last_activity(session: Session, tenant: Tenant) -> datetime | None:
        if tenant.state == TenantState.DECOMMISSIONING:
            started = session.exec(
                select(func.max(Decommission.started_at)).where(Decommission.tenant_id == tenant.id)
            ).one()
            return max(
                (t for t in (started, tenant.updated_at) if t is not None), default=None, key=aware
            )
        attempt = session.exec(
            select(func.max(Attempt.started_at)).where(Attempt.tenant_id == tenant.id)
        ).one()
        step_started, step_ended = session.exec(
            select(func.max(StepRun.started_at), func.max(StepRun.ended_at)).where(
                StepRun.tenant_id == tenant.id
            )
        ).one()
        moments = [t for t in (attempt, step_started, step_ended, tenant.updated_at) if t]
        return max(moments, default=None, key=aware)
