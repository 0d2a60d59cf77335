"""``provisioner doctor``: is this deployment healthy, and if not, what should the operator do?

Each check reads what is true now (broker, Redis, database and migrations, queue depths, the
outbox backlog, the per-tenant locks, sagas nobody is running) and answers with a
:class:`Finding`: ``ok`` or not, one line saying what was seen, and for a problem the command
that fixes it. A source that does not answer is itself a finding, never a crash, so the doctor
works best exactly when something is down. It changes nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from kombu import Connection
from redis import Redis
from sqlalchemy import Engine, func, text
from sqlmodel import Session, col, select

from config.keys import (
    AUDIT_QUEUE,
    COMMANDS_QUEUE,
    LOCK_PREFIX,
    LOCK_TTL_MS,
    RELAY_GRACE_S,
    SAGA_QUEUE,
    processing_key,
)
from config.settings import Settings
from sagas.states import TenantState
from service.db.engine import make_engine
from service.db.migrate import current_revision, head_revision
from service.db.models import Attempt, Decommission, OutboxEvent, StepRun, Tenant
from service.locks import LockToken
from service.worker_leases import WorkerLeases, is_redis_broker

TIMEOUT_S = 5.0
# An unpublished outbox row older than this was not published by the process that wrote it (it
# publishes right after commit) nor by the relay loop (it polls every second, after a grace).
OUTBOX_STALE_S = max(30.0, 10 * RELAY_GRACE_S)
# Messages waiting in one queue beyond which the consumers are not keeping up.
QUEUE_BACKLOG_LIMIT = 1000
# A run nobody has touched for this long, with no lock holder, has lost its worker.
STALLED_AFTER_S = LOCK_TTL_MS / 1000
# A lock that looks stale is read again after this pause: a run that just ended releases its lock
# right after its commit, and must not be reported for that instant.
LOCK_RECHECK_S = 0.5

QUEUES: tuple[tuple[str, str], ...] = (
    (SAGA_QUEUE, "provisioner worker"),
    (COMMANDS_QUEUE, "provisioner listen"),
    (AUDIT_QUEUE, "provisioner consume"),
)


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    ok: bool
    summary: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _error(exc: BaseException) -> str:
    """One line, not a page: the first line of the message, shortened."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def _age_s(value: datetime | None, now: datetime) -> float | None:
    return None if value is None else round((now - _aware(value)).total_seconds(), 1)


class Doctor:
    def __init__(
        self,
        settings: Settings,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings
        self._now = now
        self._sleep = sleep
        # No migrations here: the doctor reports a schema that is behind, it does not fix it.
        self._engine: Engine = make_engine(settings.database_url)
        self._redis = Redis.from_url(
            settings.redis_url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
        )

    def examine(self) -> list[Finding]:
        findings: list[Finding] = [*self.broker(), *self.redis(), *self.database()]
        if any(f.check in ("database", "migrations") and not f.ok for f in findings):
            # Without the schema the tables below cannot be read: say so once, not twice.
            skipped = "not checked: the database is not ready (see above)"
            return [*findings, Finding("outbox", False, skipped), Finding("locks", False, skipped)]
        return [*findings, *self.outbox(), *self.locks()]

    # --- the broker and its queues ---
    def broker(self) -> Iterator[Finding]:
        url = self._settings.broker_url
        try:
            with Connection(url, connect_timeout=TIMEOUT_S) as connection:
                connection.ensure_connection(max_retries=1, timeout=TIMEOUT_S)
                transport = connection.transport_cls
                yield Finding("broker", True, f"connected ({transport})")
                for queue, consumer in QUEUES:
                    yield self._queue(connection, queue, consumer)
            if is_redis_broker(url):
                yield self._workers(url)
                yield self._unreadable(url)
        except Exception as exc:
            yield Finding(
                "broker",
                False,
                f"cannot connect: {_error(exc)}",
                "start the broker, or fix PROVISIONER_BROKER_URL (nothing runs without it)",
            )

    def _queue(self, connection: Connection, queue: str, consumer: str) -> Finding:
        name = f"queue {queue}"
        channel = connection.channel()  # a fresh channel: a refused passive declare closes it
        try:
            _, messages, consumers = channel.queue_declare(queue=queue, passive=True)
        except Exception as exc:
            if (
                getattr(exc, "code", None) == 404
                or "NOT_FOUND" in str(exc)
                or "no queue" in str(exc)
            ):
                # Redis drops an empty list, RabbitMQ has no queue until someone declares it.
                return Finding(name, True, "empty (not declared, or no message waiting)")
            return Finding(name, False, f"cannot inspect: {_error(exc)}", "check the broker")
        finally:
            with contextlib.suppress(Exception):  # a channel the broker closed already
                channel.close()
        details: dict[str, Any] = {"messages": messages}
        on_redis = connection.transport.driver_type == "redis"
        if on_redis:
            details["consumers"] = None  # the Redis transport cannot tell
            if queue == SAGA_QUEUE:
                details["unacked"] = self._redis_unacked()
        else:
            details["consumers"] = consumers
        summary = (
            f"{messages} waiting"
            + ("" if on_redis else f", {consumers} consumer(s)")
            + (
                f", {details['unacked']} delivered and unacknowledged"
                if details.get("unacked")
                else ""
            )
        )
        if not on_redis and messages and not consumers:
            return Finding(
                name, False, summary, f"nothing consumes it: start `{consumer}`", details
            )
        if messages >= QUEUE_BACKLOG_LIMIT:
            return Finding(
                name,
                False,
                summary,
                f"its consumers are not keeping up: start more `{consumer}` processes (or check "
                "that the running ones are not stuck)",
                details,
            )
        return Finding(name, True, summary, None, details)

    def _redis_unacked(self) -> int | None:
        """Steps delivered and not yet acknowledged, over every worker (running, waiting out a
        retry countdown, or held by a dead worker until its lease lapses)."""
        try:
            leases = WorkerLeases(self._settings.broker_url)
            try:
                return sum(i.unacked for i in leases.incarnations())
            finally:
                leases.close()
        except Exception:
            return None

    @staticmethod
    def _workers(url: str) -> Finding:
        """Redis broker: the workers' leases, and steps a dead worker still holds."""
        leases = WorkerLeases(url)
        try:
            found = leases.incarnations()
        except Exception as exc:
            return Finding("workers", False, f"cannot read the leases: {_error(exc)}")
        finally:
            leases.close()
        alive = [i for i in found if i.alive]
        dead = [i for i in found if not i.alive and i.unacked]
        summary = f"{len(alive)} worker(s) holding a lease"
        details: dict[str, Any] = {
            "alive": [i.name for i in alive],
            "dead_holding_steps": {i.name: i.unacked for i in dead},
        }
        if dead and not alive:
            held = sum(i.unacked for i in dead)
            return Finding(
                "workers",
                False,
                f"{summary}; {held} step(s) held by dead worker(s) wait for a live one",
                "start `provisioner worker`: it hands the dead workers' steps out again",
                details,
            )
        if dead:
            # A live worker sweeps every WORKER_LEASE_RENEW_S: this clears itself in seconds.
            summary += f"; {len(dead)} dead worker(s)' steps are being handed out again"
        return Finding("workers", True, summary, None, details)

    @staticmethod
    def _unreadable(url: str) -> Finding:
        """Redis broker: raw entries on a queue's list that are no kombu message, set aside by
        service/reliable_redis.py (kept, never put back)."""
        keys = [f"{processing_key(queue)}:unreadable" for queue, _ in QUEUES]
        client = Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        try:
            sizes = {key: int(client.llen(key)) for key in keys}
        except Exception as exc:
            return Finding("unreadable messages", False, f"cannot read: {_error(exc)}")
        finally:
            client.close()
        found = {key: size for key, size in sizes.items() if size}
        if not found:
            return Finding("unreadable messages", True, "none set aside")
        where = ", ".join(f"{size} in {key}" for key, size in found.items())
        return Finding(
            "unreadable messages",
            False,
            f"set aside, not kombu messages: {where}",
            "read them with `redis-cli LRANGE <key> 0 -1`, find who pushes raw data onto the "
            "queue, then `redis-cli DEL <key>`",
            {"keys": found},
        )

    # --- Redis: locks and fault plans ---
    def redis(self) -> Iterator[Finding]:
        try:
            self._redis.ping()
            scripted = int(cast(Any, self._redis.eval("return 1", 0)))
        except Exception as exc:
            yield Finding(
                "redis",
                False,
                f"cannot use {self._settings.redis_url}: {_error(exc)}",
                "start Redis, or fix PROVISIONER_REDIS_URL (locks and fault plans live there)",
            )
            return
        if scripted != 1:
            yield Finding(
                "redis",
                False,
                "PING answers but a Lua EVAL does not",
                "use a Redis that runs Lua scripts (the locks need them)",
            )
            return
        yield Finding("redis", True, "PING and Lua EVAL answer")

    # --- the database and its schema ---
    def database(self) -> Iterator[Finding]:
        try:
            with self._engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            current, head = current_revision(self._engine), head_revision(self._engine)
        except Exception as exc:
            yield Finding(
                "database",
                False,
                f"cannot query: {_error(exc)}",
                "start the database, or fix PROVISIONER_DATABASE_URL",
            )
            return
        yield Finding("database", True, "answers", details={"dialect": self._engine.dialect.name})
        revisions = {"current": current, "head": head}
        if current == head:
            yield Finding("migrations", True, f"at head ({head})", details=revisions)
        else:
            yield Finding(
                "migrations",
                False,
                f"database at {current or 'no schema'}, this code expects {head}",
                "start any provisioner process with this code (e.g. `provisioner list`): it "
                "migrates at start, once; a revision newer than head means this host runs an "
                "older provisioner than the database: upgrade it",
                revisions,
            )

    # --- the outbox ---
    def outbox(self) -> Iterator[Finding]:
        try:
            with Session(self._engine) as session:
                backlog, oldest = session.exec(
                    select(func.count(), func.min(OutboxEvent.created_at)).where(
                        col(OutboxEvent.published_at).is_(None)
                    )
                ).one()
        except Exception as exc:
            yield Finding("outbox", False, f"cannot read: {_error(exc)}", "see `database`")
            return
        age = _age_s(oldest, self._now())
        details = {"unpublished": int(backlog), "oldest_age_s": age}
        if age is not None and age > OUTBOX_STALE_S:
            yield Finding(
                "outbox",
                False,
                f"{backlog} event(s) unpublished, the oldest for {age:.0f}s",
                "the relay is not publishing them: start `provisioner relay` (part of `up`), and "
                "check the broker above; nothing is lost meanwhile",
                details,
            )
        else:
            yield Finding(
                "outbox", True, f"{backlog} event(s) waiting to be published", None, details
            )

    # --- locks and runs nobody runs ---
    def locks(self) -> Iterator[Finding]:
        try:
            held = self._held_locks()
            findings = self._stale_locks(held)
            findings.extend(self._stalled_runs(set(held)))
        except Exception as exc:
            yield Finding(
                "locks",
                False,
                f"cannot check: {_error(exc)}",
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
                name = _text(key)
                held[name[len(LOCK_PREFIX) :]] = _text(raw)
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
            if current is None or _text(current) != held[slug]:
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
                age = _age_s(last, now)
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
                (t for t in (started, tenant.updated_at) if t is not None), default=None, key=_aware
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
        return max(moments, default=None, key=_aware)


def healthy(findings: list[Finding]) -> bool:
    return all(f.ok for f in findings)


def as_json(findings: list[Finding]) -> dict[str, Any]:
    return {"healthy": healthy(findings), "checks": [asdict(f) for f in findings]}
