"""The doctor's examination: every check, in the order an operator reads them."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from redis import Redis

from config.settings import Settings
from service.db.engine import make_engine
from service.doctor.broker_checks import BrokerChecks
from service.doctor.findings import TIMEOUT_S, Finding
from service.doctor.lock_checks import LockChecks
from service.doctor.store_checks import StoreChecks


class Doctor:
    def __init__(
        self,
        settings: Settings,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        # No migrations here: the doctor reports a schema that is behind, it does not fix it.
        engine = make_engine(settings.database_url)
        redis = Redis.from_url(
            settings.redis_url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
        )
        self._broker = BrokerChecks(settings)
        self._stores = StoreChecks(settings, engine, redis, now)
        self._locks = LockChecks(engine, redis, now=now, sleep=sleep)

    def examine(self) -> list[Finding]:
        findings: list[Finding] = [
            *self._broker.broker(),
            *self._stores.redis(),
            *self._stores.database(),
        ]
        if any(f.check in ("database", "migrations") and not f.ok for f in findings):
            # Without the schema the tables below cannot be read: say so once, not twice.
            skipped = "not checked: the database is not ready (see above)"
            return [*findings, Finding("outbox", False, skipped), Finding("locks", False, skipped)]
        return [*findings, *self._stores.outbox(), *self._locks.locks()]
