"""Gauges computed when ``/metrics`` is scraped: what is true now, read from Redis and the DB.

Nothing here is recorded by a process as it happens, so it needs no multiprocess files and cannot
drift: the locks held (and how old they are) come from scanning ``lock:*`` in Redis, the outbox
backlog and the audit lag from the database. A source that does not answer is reported through
``provisioner_scrape_errors`` instead of failing the whole scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from redis import Redis
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from config.keys import LOCK_PREFIX
from service.db.models import AuditEvent, OutboxEvent, Tenant
from service.locks import TenantLocks

log = structlog.get_logger(__name__)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class LiveGauges(Collector):
    def __init__(
        self,
        *,
        engine: Engine,
        redis: Redis,
        locks: TenantLocks,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._engine = engine
        self._redis = redis
        self._locks = locks
        self._now = now

    def collect(self) -> Iterable[Metric]:
        errors = GaugeMetricFamily(
            "provisioner_scrape_errors",
            "Sources that did not answer during this scrape (1), by source.",
            labels=["source"],
        )
        for source, produce in (
            ("redis", self._lock_metrics),
            ("database", self._database_metrics),
        ):
            try:
                yield from produce()
                errors.add_metric([source], 0)
            except Exception as exc:
                log.warning("metrics.source_failed", source=source, error=str(exc)[:300])
                errors.add_metric([source], 1)
        yield errors

    # --- Redis: the per-tenant locks ---
    def _lock_metrics(self) -> list[Metric]:
        held = GaugeMetricFamily(
            "provisioner_locks_held", "Per-tenant locks held in Redis right now (lock:* keys)."
        )
        age = GaugeMetricFamily(
            "provisioner_lock_age_seconds",
            "How long each held lock has been held (since its run acquired it), by slug.",
            labels=["slug"],
        )
        ttl = GaugeMetricFamily(
            "provisioner_lock_ttl_seconds",
            "Time left before each held lock expires unless renewed, by slug.",
            labels=["slug"],
        )
        oldest = GaugeMetricFamily(
            "provisioner_lock_oldest_age_seconds",
            "Age of the oldest held lock (0 when none is held): a stuck saga shows up here.",
        )
        count, ages = 0, [0.0]
        for key in self._redis.scan_iter(match=f"{LOCK_PREFIX}*", count=500):
            raw = key.decode() if isinstance(key, bytes) else str(key)
            info = self._locks.info(raw.removeprefix(LOCK_PREFIX))
            if not info.held:
                continue  # expired between the scan and the read
            count += 1
            if info.age_s is not None:
                age.add_metric([info.slug], info.age_s)
                ages.append(info.age_s)
            if info.ttl_s is not None:
                ttl.add_metric([info.slug], info.ttl_s)
        held.add_metric([], count)
        oldest.add_metric([], max(ages))
        return [held, age, ttl, oldest]

    # --- the database: outbox, audit store, tenants ---
    def _database_metrics(self) -> list[Metric]:
        now = self._now()
        with Session(self._engine) as session:
            unpublished = col(OutboxEvent.published_at).is_(None)
            backlog, oldest_row = session.exec(
                select(func.count(), func.min(OutboxEvent.created_at)).where(unpublished)
            ).one()
            newest = session.exec(
                select(AuditEvent.received_at, AuditEvent.time)
                .where(col(AuditEvent.time).is_not(None))
                .order_by(col(AuditEvent.seq).desc())
                .limit(1)
            ).first()
            states = session.exec(select(Tenant.state, func.count()).group_by(Tenant.state)).all()
        outbox = GaugeMetricFamily(
            "provisioner_outbox_backlog", "Outbox events not yet published to tenant.events."
        )
        outbox.add_metric([], int(backlog))
        outbox_age = GaugeMetricFamily(
            "provisioner_outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox event (0 when the backlog is empty).",
        )
        outbox_age.add_metric(
            [], (now - _aware(oldest_row)).total_seconds() if oldest_row is not None else 0.0
        )
        lag = GaugeMetricFamily(
            "provisioner_audit_lag_seconds",
            "For the newest event in the audit store: received_at minus its CloudEvent time.",
        )
        if newest is not None and newest[1] is not None:
            lag.add_metric([], max(0.0, (_aware(newest[0]) - _aware(newest[1])).total_seconds()))
        tenants = GaugeMetricFamily(
            "provisioner_tenants", "Tenants by state (every tenant_id ever made).", labels=["state"]
        )
        for state, count in states:
            tenants.add_metric([str(state)], int(count))
        return [outbox, outbox_age, lag, tenants]
