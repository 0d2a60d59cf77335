"""The processed-commands table (the same command id acts once) on the driver's cursor: every
command reads it first, and a provisioning command writes its row in the transaction that creates
the tenant (service/tenant_creation.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, bindparam, insert, select
from sqlmodel import col

from service.db.driver_statements import DriverStatement
from service.db.models import ProcessedCommand

_COLUMNS = ("command_id", "type", "slug", "outcome", "reason", "received_at")
INSERT_PROCESSED = insert(ProcessedCommand).values({name: bindparam(name) for name in _COLUMNS})
_SEEN = select(col(ProcessedCommand.outcome), col(ProcessedCommand.reason)).where(
    col(ProcessedCommand.command_id) == bindparam("command_id")
)


def processed_values(
    command_id: str,
    command_type: str,
    slug: str,
    outcome: str,
    reason: str | None,
    now: datetime,
) -> dict[str, Any]:
    """A processed row's columns (``INSERT_PROCESSED``'s parameters, or a ``ProcessedCommand``'s
    fields); the slug cut to its column, since a malformed command's may be any length."""
    return {
        "command_id": command_id,
        "type": command_type[:200],
        "slug": slug[:200],
        "outcome": outcome,
        "reason": reason,
        "received_at": now,
    }


class SeenCommands:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._seen = DriverStatement(_SEEN, engine.dialect)

    def __call__(self, command_id: str) -> tuple[str, str | None] | None:
        """``(outcome, reason)`` of a command handled before, else None."""
        with self._engine.connect() as connection:
            row = self._seen.first(connection, {"command_id": command_id})
        return None if row is None else (str(row[0]), row[1])
