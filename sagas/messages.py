"""Command and event names of the public contract, and the typed command payloads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from sagas.errors import MalformedCommand


class CommandType(StrEnum):
    PROVISION = "tenant.provision_requested"
    RETRY = "tenant.retry_requested"
    RESET = "tenant.reset_requested"
    DECOMMISSION = "tenant.decommission_requested"


class EventType(StrEnum):
    STARTED = "tenant.provisioning.started"
    STEP_STARTED = "tenant.provisioning.step_started"
    STEP_COMPLETED = "tenant.provisioning.step_completed"
    STEP_SKIPPED = "tenant.provisioning.step_skipped"
    STEP_RETRYING = "tenant.provisioning.step_retrying"
    FAILED = "tenant.provisioning.failed"
    COMPLETED = "tenant.provisioning.completed"
    RESET = "tenant.provisioning.reset"
    DECOMMISSION_STARTED = "tenant.decommission.started"
    DECOMMISSION_STEP_COMPLETED = "tenant.decommission.step_completed"
    DECOMMISSION_COMPLETED = "tenant.decommission.completed"
    DECOMMISSION_FAILED = "tenant.decommission.failed"
    COMMAND_REJECTED = "tenant.command.rejected"


# Bounded so a hostile command cannot push megabytes into a log line or a table. The slug
# itself is only checked for shape by the saga's validate step (a bad slug is a tenant that
# fails validation, per the contract); here it must merely be a sane string.
ShortText = Annotated[str, StringConstraints(max_length=200)]
Slug = Annotated[str, StringConstraints(min_length=1, max_length=200)]
LongText = Annotated[str, StringConstraints(max_length=2000)]


class _CommandData(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    slug: Slug
    requested_by: ShortText = "unknown"
    reason: LongText | None = None


class ProvisionData(_CommandData):
    plan: ShortText
    admin_email: ShortText | None = None


class RetryData(_CommandData):
    force: bool = False


class ResetData(_CommandData):
    pass


class DecommissionData(_CommandData):
    pass


DATA_MODELS: dict[CommandType, type[_CommandData]] = {
    CommandType.PROVISION: ProvisionData,
    CommandType.RETRY: RetryData,
    CommandType.RESET: ResetData,
    CommandType.DECOMMISSION: DecommissionData,
}


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    specversion: Literal["1.0"]
    id: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    source: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    type: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    time: ShortText | None = None
    subject: ShortText | None = None
    data: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Command:
    id: str
    type: CommandType
    data: _CommandData

    @property
    def slug(self) -> str:
        return self.data.slug


ACCEPTED_CONTENT_TYPES = frozenset({"application/cloudevents+json", "application/json"})


@dataclass(frozen=True, slots=True)
class Salvage:
    """What could be read from a malformed command, so that its rejection can name it."""

    command_id: str | None
    command_type: str | None
    slug: str | None


def salvage(body: bytes | str) -> Salvage:
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return Salvage(None, None, None)
    if not isinstance(raw, dict):
        return Salvage(None, None, None)

    def text(value: Any) -> str | None:
        return value[:200] if isinstance(value, str) else None

    data = raw.get("data")
    slug = text(data.get("slug")) if isinstance(data, dict) else None
    return Salvage(text(raw.get("id")), text(raw.get("type")), slug)


def parse_command(body: bytes | str, content_type: str | None) -> Command:
    """Parse a command CloudEvent (structured JSON); raise :class:`MalformedCommand` saying why."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in ACCEPTED_CONTENT_TYPES:
        raise MalformedCommand(
            f"content type {content_type!r} is not application/cloudevents+json or application/json"
        )
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedCommand(f"body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MalformedCommand("body is not a JSON object")
    try:
        envelope = _Envelope.model_validate(raw)
    except ValidationError as exc:
        raise MalformedCommand(f"not a CloudEvent 1.0: {_first_error(exc)}") from None
    try:
        command_type = CommandType(envelope.type)
    except ValueError:
        raise MalformedCommand(f"unknown command type {envelope.type[:80]!r}") from None
    try:
        data = DATA_MODELS[command_type].model_validate(envelope.data)
    except ValidationError as exc:
        raise MalformedCommand(f"bad data: {_first_error(exc)}") from None
    return Command(id=envelope.id, type=command_type, data=data)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"[:300]
