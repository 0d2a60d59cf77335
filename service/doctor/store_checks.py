"""The doctor's store checks: Redis (locks and fault plans need Lua), the database and its
migrations, and the outbox's backlog."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, cast

from redis import Redis
from sqlalchemy import Engine, func, text
from sqlmodel import Session, col, select

from config.keys import RELAY_GRACE_S
from config.settings import Settings
from service.db.migrate import current_revision, head_revision
from service.db.models import OutboxEvent
from service.doctor.findings import Finding, age_s, describe

# An unpublished outbox row older than this was not published by the process that wrote it (it
# publishes right after commit) nor by the relay loop (it polls every second, after a grace).
OUTBOX_STALE_S = max(30.0, 10 * RELAY_GRACE_S)


class StoreChecks:
    def __init__(
        self, settings: Settings, engine: Engine, redis: Redis, now: Callable[[], datetime]
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._redis = redis
        self._now = now

    # --- Redis: locks and fault plans ---
    def redis(self) -> Iterator[Finding]:
        try:
            self._redis.ping()
            scripted = int(cast(Any, self._redis.eval("return 1", 0)))
        except Exception as exc:
            yield Finding(
                "redis",
                False,
                f"cannot use {self._settings.redis_url}: {describe(exc)}",
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
                f"cannot query: {describe(exc)}",
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
            yield Finding("outbox", False, f"cannot read: {describe(exc)}", "see `database`")
            return
        age = age_s(oldest, self._now())
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
