"""Build the CloudEvents 1.0 the service emits (structured JSON mode), and read them.

Events are written by hand, not through the ``cloudevents`` library's ``CloudEvent`` and
``JSONFormat``: every step of every saga writes two, and the library's attribute checks and
encoder cost twice the JSON itself (57 µs against 27 µs an event, docs/benchmarks.md, round 8).
The attributes are fixed here (the id a fresh uuid4, the source a constant, the type one of
``EventType``, the time an aware datetime), so none of those checks could fail. What is written is
the library's bytes exactly: ``tests/unit/test_events.py`` compares the two, and events are still
read, and checked, by the library (``read_event``).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.formats.json import JSONFormat

from config.keys import EVENT_SOURCE
from sagas.messages import EventType

SPECVERSION = "1.0"
DATA_CONTENT_TYPE = "application/json"

_FORMAT = JSONFormat()


def rfc3339(moment: datetime) -> str:
    """A datetime as the CloudEvents JSON format writes one: ISO 8601, ``Z`` for UTC."""
    text = moment.isoformat()
    return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text


def _encode_datetime(value: object) -> str:
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.dumps's defaults (separators, ASCII escapes), as the library's encoder has them.
_ENCODER = json.JSONEncoder(default=_encode_datetime)


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
    moment = time or datetime.now(UTC)
    if moment.tzinfo is None:
        raise ValueError("an event's time must say its offset (an aware datetime)")
    event_id = str(uuid.uuid4())
    # The library's order: its attributes as given, then the spec version, then the data.
    event: dict[str, Any] = {
        "id": event_id,
        "source": EVENT_SOURCE,
        "type": EventType(event_type).value,
        "time": rfc3339(moment),
        "datacontenttype": DATA_CONTENT_TYPE,
    }
    if subject:
        event["subject"] = subject
    event["specversion"] = SPECVERSION
    event["data"] = data
    return event_id, _ENCODER.encode(event)


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
