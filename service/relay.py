"""The outbox relay: publish committed events, then mark them sent.

Publish-then-mark means a crash in between publishes an event twice, never zero times; the
audit store and careful consumers dedup on the CloudEvent id. What a process publishes right
after its commit is marked in batches a moment later (service/marks.py); the relay loop marks
each batch it publishes at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import Engine, func, update
from sqlmodel import Session, col, select

from config.keys import RELAY_GRACE_S, RELAY_POLL_S
from service.db.engine import WRITE_OPTION
from service.db.models import OutboxEvent
from service.marks import BatchedMarks
from service.outbox import Publishable
from service.publisher import Publisher

log = structlog.get_logger(__name__)

BATCH = 500


class OutboxRelay:
    def __init__(self, engine: Engine, publisher: Publisher) -> None:
        self._engine = engine
        self._publisher = publisher
        self._writer = engine.execution_options(**{WRITE_OPTION: True})
        self._marks = BatchedMarks(self._mark)

    def publish_now(self, rows: Sequence[Publishable], *, with_next_message: bool = False) -> None:
        """Right after the commit that wrote ``rows``: publish them, in order; they are marked
        a moment later, with other rows, off the caller's path (service/marks.py).
        ``with_next_message``: a step's end, whose events may go out with the task's next
        message, in its round trip (service/held_publishes.py).

        A failure is logged, not raised: the rows stay unpublished and the relay loop sends
        them once the broker is back.
        """
        if not rows:
            return
        ids = [row.id for row in rows if row.id is not None]
        try:
            self._publisher.publish_events(
                ((row.type, row.body) for row in rows),
                on_sent=lambda: self._marks.add(ids),
                with_next_message=with_next_message,
            )
        except Exception as exc:
            log.warning("outbox.publish_deferred", error=str(exc), events=len(rows))

    def flush_marks(self) -> None:
        """Mark, now, every row this process published and has not marked yet (at exit)."""
        self._marks.stop()

    def drain(self, *, grace_s: float = RELAY_GRACE_S) -> int:
        """Publish every unpublished row older than ``grace_s``; return how many."""
        cutoff = datetime.now(UTC) - timedelta(seconds=grace_s)
        total = 0
        while True:
            with Session(self._engine) as session:
                rows = session.exec(
                    select(OutboxEvent)
                    .where(col(OutboxEvent.published_at).is_(None))
                    .where(col(OutboxEvent.created_at) <= cutoff)
                    .order_by(col(OutboxEvent.id))
                    .limit(BATCH)
                ).all()
            if not rows:
                return total
            self._publisher.publish_events((row.type, row.body) for row in rows)
            self._mark([row.id for row in rows if row.id is not None])
            total += len(rows)
            if len(rows) < BATCH:
                return total

    def backlog(self) -> int:
        with Session(self._engine) as session:
            return int(
                session.exec(
                    select(func.count())
                    .select_from(OutboxEvent)
                    .where(col(OutboxEvent.published_at).is_(None))
                ).one()
            )

    def run(self, stop: threading.Event, *, poll_s: float = RELAY_POLL_S) -> None:
        log.info("relay.started")
        while not stop.is_set():
            try:
                sent = self.drain()
                if sent:
                    log.info("relay.published", events=sent)
            except Exception as exc:
                log.warning("relay.error", error=str(exc))
                time.sleep(poll_s)
            stop.wait(poll_s)
        log.info("relay.stopped")

    def _mark(self, ids: list[int]) -> None:
        if not ids:
            return
        # Core, not a Session: an ORM unit of work costs twice as much for one UPDATE.
        with self._writer.begin() as connection:
            connection.execute(
                update(OutboxEvent)
                .where(col(OutboxEvent.id).in_(ids))
                .values(published_at=datetime.now(UTC))
            )
