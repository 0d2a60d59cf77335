"""The floor: the least a durable, audited step can cost on the same Celery chain.

A bare chain whose every task also does what any saga step that keeps its state and reports
it must do at least once: commit one row to the service's database (one plain ``INSERT``
through the driver, no ORM, no fence, no lock), and publish two CloudEvents to
``tenant.events`` through the service's publisher, which the audit consumer then stores. It
has none of the saga's other work (the pick-up read, the lock and fault-plan round trip, the
fence in the write transaction, the next step's announcement, the marks).

The bench runs it beside the bare chain and the saga: floor / bare says what the targets
leave for everything else (docs/benchmarks.md, "The floor").
"""

from __future__ import annotations

import os

from sqlalchemy import Column, Engine, Integer, MetaData, String, Table

from sagas.messages import EventType
from service.db.engine import make_engine
from service.events import build_event
from service.publisher import Publisher

FLOOR_PREFIX = "floor-"
FLOOR_STEPS = Table(
    "bench_floor_steps",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("run_id", String(64), nullable=False),
    Column("idx", Integer, nullable=False),
)


def create_table(engine: Engine) -> None:
    FLOOR_STEPS.create(engine, checkfirst=True)


class FloorWork:
    """One worker process's: the service's engine (same pool and pragmas) and publisher."""

    def __init__(self, database_url: str, broker_url: str) -> None:
        self._engine = make_engine(database_url)
        self._publisher = Publisher(broker_url)
        marker = "?" if self._engine.dialect.paramstyle == "qmark" else "%s"
        self._insert = f"INSERT INTO {FLOOR_STEPS.name} (run_id, idx) VALUES ({marker}, {marker})"

    def step(self, run_id: str, index: int) -> None:
        # The driver's own connection: no statement compiled, cached or coerced, so that
        # what is measured is the commit itself.
        connection = self._engine.raw_connection()
        try:
            cursor = connection.cursor()
            cursor.execute(self._insert, (run_id, index))
            cursor.close()
            connection.commit()
        finally:
            connection.close()
        subject = f"{FLOOR_PREFIX}{run_id[:12]}"
        about = {"tenant_id": run_id, "slug": subject, "state": "provisioning"}
        completed = {**about, "attempt_number": 1, "step": str(index), "duration_ms": 0}
        started = {**about, "attempt_number": 1, "step": str(index + 1)}
        bodies = [
            (
                EventType.STEP_COMPLETED.value,
                build_event(EventType.STEP_COMPLETED, subject, completed)[1],
            ),
            (
                EventType.STEP_STARTED.value,
                build_event(EventType.STEP_STARTED, subject, started)[1],
            ),
        ]
        self._publisher.publish_events(bodies)


_work: dict[int, FloorWork] = {}


def work() -> FloorWork:
    """This process's (built after the fork, on first use)."""
    pid = os.getpid()
    if pid not in _work:
        from config.settings import get_settings

        settings = get_settings()
        _work[pid] = FloorWork(settings.database_url, settings.broker_url)
    return _work[pid]
