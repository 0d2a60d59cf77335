"""Write events into the outbox inside the caller's transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import insert
from sqlmodel import Session, col

from sagas.messages import EventType
from service.db.models import OutboxEvent
from service.events import build_event


class Publishable(Protocol):
    """What the relay needs of a written outbox row: its id (to mark it), type and body."""

    @property
    def id(self) -> int | None: ...

    @property
    def type(self) -> str: ...

    @property
    def body(self) -> str: ...


@dataclass(frozen=True, slots=True)
class WrittenEvent:
    """An outbox row as the step's Core transaction wrote it: building an ORM instance only to
    carry these three cost more than the row's INSERT (docs/benchmarks.md)."""

    id: int | None
    type: str
    body: str


class PendingEvents:
    """The outbox rows one transaction wrote, so they can be published right after commit."""

    def __init__(self) -> None:
        self.rows: list[OutboxEvent] = []
        self._prepared: list[dict[str, Any]] = []

    def add(
        self, session: Session, event_type: EventType, subject: str | None, data: dict[str, Any]
    ) -> OutboxEvent:
        event_id, body = build_event(event_type, subject, data)
        row = OutboxEvent(
            event_id=event_id, type=event_type.value, subject=subject or None, body=body
        )
        session.add(row)
        self.rows.append(row)
        return row

    @property
    def ids(self) -> list[int]:
        return [row.id for row in self.rows if row.id is not None]

    def prepare(
        self, event_type: EventType, subject: str, data: dict[str, Any], *, now: datetime
    ) -> None:
        """Build an event now, before the transaction that will write it (``write_prepared``):
        a CloudEvent is not built while the database's write lock is held."""
        event_id, body = build_event(event_type, subject, data, time=now)
        self._prepared.append(
            {
                "event_id": event_id,
                "type": event_type.value,
                "subject": subject,
                "body": body,
                "created_at": now,
            }
        )

    def write_prepared(self, session: Session) -> None:
        """Insert the prepared events, in order, in one statement (ids in that order)."""
        if not self._prepared:
            return
        ids = session.execute(
            insert(OutboxEvent).returning(col(OutboxEvent.id), sort_by_parameter_order=True),
            self._prepared,
        ).scalars()
        self.rows.extend(
            OutboxEvent(id=row_id, **values)
            for row_id, values in zip(ids, self._prepared, strict=True)
        )
        self._prepared = []
