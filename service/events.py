"""Build the CloudEvents 1.0 the service emits (structured JSON mode)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from config.keys import EVENT_SOURCE
from sagas.messages import EventType

_FORMAT = JSONFormat()


def build_event(
    event_type: EventType,
    subject: str | None,
    data: dict[str, Any],
    *,
    time: datetime | None = None,
) -> tuple[str, str]:
    """Return ``(event_id, body)``; the body is the structured-mode JSON of a valid CloudEvent.

    ``subject`` is the tenant slug; a rejection of a command that named no slug has none (the
    CloudEvents spec forbids an empty subject, so it is left out)."""
    event_id = str(uuid.uuid4())
    attributes: dict[str, Any] = {
        "id": event_id,
        "source": EVENT_SOURCE,
        "type": event_type.value,
        "time": time or datetime.now(UTC),
        "datacontenttype": "application/json",
    }
    if subject:
        attributes["subject"] = subject
    event = CloudEvent(attributes, data)
    return event_id, _FORMAT.write(event).decode("utf-8")


def read_event(body: bytes | str) -> dict[str, Any]:
    """Parse and validate a structured CloudEvent; raise ``ValueError`` if it is not one."""
    try:
        event = _FORMAT.read(None, body)
    except Exception as exc:
        raise ValueError(f"not a CloudEvent: {exc}") from exc
    result: dict[str, Any] = dict(event.get_attributes())
    data = event.get_data()
    if isinstance(data, (bytes, bytearray)):
        raise ValueError("event data is binary; expected a JSON object")
    if isinstance(data, str):
        data = json.loads(data)
    result["data"] = data
    return result
