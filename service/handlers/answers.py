"""How commands are answered: accepted, refused (``tenant.command.rejected``), or already
handled (the same command id acts once). Shared by every use case."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from sagas.errors import CommandRejected
from sagas.messages import CommandType, EventType
from sagas.rules import Reason
from service import metrics
from service import repository as repo
from service.command_records import SeenCommands, processed_values
from service.db.engine import unit_of_work
from service.db.models import DeadLetter, ProcessedCommand
from service.dead_letters import already_kept
from service.outbox import PendingEvents
from service.relay import OutboxRelay

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a command was answered; ``event_type`` is the first event it caused."""

    command_id: str
    command_type: str
    slug: str
    accepted: bool
    event_type: str
    message: str
    reason: str | None = None
    duplicate: bool = False
    tenant_id: str | None = None
    attempt_number: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Request:
    command_type: CommandType
    slug: str
    requested_by: str = "unknown"
    command_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    reason: str | None = None


def locked_message(slug: str) -> str:
    return (
        f"tenant {slug!r} is locked by a running attempt; wait for it to end, or, if it is "
        f"stuck, reset first (provisioner reset {slug})"
    )


class CommandBook:
    """The processed-commands table and the rejection path."""

    def __init__(self, engine: Engine, relay: OutboxRelay) -> None:
        self._engine = engine
        self._relay = relay
        self._seen = SeenCommands(engine)

    def duplicate(self, request: Request) -> Outcome | None:
        seen = self._seen(request.command_id)
        if seen is None:
            return None
        outcome, reason = seen
        return Outcome(
            command_id=request.command_id,
            command_type=request.command_type.value,
            slug=request.slug,
            accepted=outcome == "accepted",
            duplicate=True,
            event_type="",
            reason=reason,
            message=f"command {request.command_id} was already handled ({outcome})",
        )

    def processed_values(
        self, request: Request, outcome: str, reason: str | None = None
    ) -> dict[str, Any]:
        return processed_values(
            request.command_id,
            request.command_type.value,
            request.slug,
            outcome,
            reason,
            datetime.now(UTC),
        )

    def processed(
        self, request: Request, outcome: str, reason: str | None = None
    ) -> ProcessedCommand:
        return ProcessedCommand(**self.processed_values(request, outcome, reason))

    def accepted(self, request: Request, event_type: EventType, message: str, **kw: Any) -> Outcome:
        log.info(
            "command.accepted",
            command_type=request.command_type.value,
            slug=request.slug,
            command_id=request.command_id,
        )
        return Outcome(
            command_id=request.command_id,
            command_type=request.command_type.value,
            slug=request.slug,
            accepted=True,
            event_type=event_type.value,
            message=message,
            **kw,
        )

    def reject(
        self,
        request: Request,
        rejected: CommandRejected,
        *,
        command_type: str | None = None,
        record: bool = True,
        extra_rows: list[Any] | None = None,
    ) -> Outcome:
        kind = command_type if command_type is not None else request.command_type.value
        events = PendingEvents()
        try:
            with unit_of_work(self._engine) as session:
                if record:
                    processed = self.processed(request, "rejected", rejected.reason)
                    processed.type = kind[:200]
                    session.add(processed)
                    session.flush()
                for row in extra_rows or []:
                    session.add(row)
                tenant = repo.tenant_by_slug(session, request.slug) if request.slug else None
                events.add(
                    session,
                    EventType.COMMAND_REJECTED,
                    request.slug[:200] or None,
                    {
                        "tenant_id": tenant.id if tenant else None,
                        "slug": request.slug[:200],
                        "state": tenant.state if tenant else None,
                        "command_type": kind,
                        "command_id": request.command_id if record else None,
                        "reason": rejected.reason,
                        "message": rejected.message,
                    },
                )
        except IntegrityError:
            if (seen := self.duplicate(request)) is not None:
                return seen
            raise
        self._relay.publish_now(events.rows)
        log.info("command.rejected", command_type=kind, slug=request.slug, reason=rejected.reason)
        metrics.command_rejected(kind, str(rejected.reason))
        return Outcome(
            command_id=request.command_id,
            command_type=kind,
            slug=request.slug,
            accepted=False,
            event_type=EventType.COMMAND_REJECTED.value,
            message=rejected.message,
            reason=str(rejected.reason),
        )

    def reject_malformed(
        self,
        *,
        command_id: str | None,
        command_type: str | None,
        slug: str | None,
        message: str,
        dead_letter: DeadLetter,
    ) -> Outcome:
        """Keep the message (dead-letter row) and answer it, in one transaction."""
        request_id = command_id or f"malformed-{uuid.uuid4()}"
        rejected = CommandRejected(Reason.MALFORMED, message)
        return self.reject(
            Request(CommandType.PROVISION, slug or "", command_id=request_id),
            rejected,
            command_type=command_type or "unknown",
            record=command_id is not None,
            extra_rows=[dead_letter],
        )

    def dead_letter_kept(self, dead_letter: DeadLetter) -> bool:
        """Whether this very message is kept already (a redelivery after a crash between the
        commit that kept and answered it and the broker's acknowledgement)."""
        with Session(self._engine) as session:
            return already_kept(session, dead_letter)
