"""Write events into the outbox inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection, bindparam, insert, inspect
from sqlalchemy.engine import Dialect
from sqlmodel import Session, col

from sagas.messages import EventType
from service.db.driver_statements import DriverStatement
from service.db.models import OutboxEvent
from service.events import build_event

OUTBOX_COLUMNS = ("event_id", "type", "subject", "body", "created_at")
_OUTBOX_TYPES = {name: inspect(OutboxEvent).columns[name].type for name in OUTBOX_COLUMNS}


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
        self._prepared.append(event_values(event_type, subject, data, now=now))

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


def event_values(
    event_type: EventType, subject: str, data: dict[str, Any], *, now: datetime
) -> dict[str, Any]:
    """An outbox row's column values: the CloudEvent built, stamped ``now``."""
    event_id, body = build_event(event_type, subject, data, time=now)
    return {
        "event_id": event_id,
        "type": event_type.value,
        "subject": subject,
        "body": body,
        "created_at": now,
    }


class OutboxInsert:
    """``rows`` events in one ``INSERT … RETURNING`` on the driver's cursor
    (service/db/driver_statements.py): for the transactions every saga runs (a step's
    completion, a tenant's creation), where an ORM instance per row cost more than the INSERT."""

    def __init__(self, dialect: Dialect, rows: int) -> None:
        self.rows = rows
        statement = (
            insert(OutboxEvent)
            .values(
                [
                    # Typed: SQLAlchemy gives the column's type to the first row's parameters only.
                    {
                        name: bindparam(f"{name}_{row}", type_=_OUTBOX_TYPES[name])
                        for name in OUTBOX_COLUMNS
                    }
                    for row in range(rows)
                ]
            )
            .returning(col(OutboxEvent.id), col(OutboxEvent.event_id))
        )
        self._statement = DriverStatement(statement, dialect)

    def write(self, connection: Connection, events: Sequence[dict[str, Any]]) -> list[WrittenEvent]:
        """Insert ``events`` (``event_values``), exactly ``rows`` of them; their rows in order."""
        if len(events) != self.rows:
            raise ValueError(f"this statement writes {self.rows} events, not {len(events)}")
        written = self._statement.all(
            connection,
            {
                f"{name}_{row}": values[name]
                for row, values in enumerate(events)
                for name in OUTBOX_COLUMNS
            },
        )
        # A multi-row INSERT's RETURNING does not promise the rows' order: each id comes back
        # with its event's id.
        ids = {event_id: row_id for row_id, event_id in written}
        return [
            WrittenEvent(ids[values["event_id"]], values["type"], values["body"])
            for values in events
        ]
