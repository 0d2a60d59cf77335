"""Write events into the outbox inside the caller's transaction."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from sagas.messages import EventType
from service.db.models import OutboxEvent
from service.events import build_event


class PendingEvents:
    """The outbox rows one transaction wrote, so they can be published right after commit."""

    def __init__(self) -> None:
        self.rows: list[OutboxEvent] = []

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
