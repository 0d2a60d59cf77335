"""The events the service writes by hand are the ``cloudevents`` library's, byte for byte
(service/events.py says why they are written by hand), and the library reads them back."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from config.keys import EVENT_SOURCE
from sagas.messages import EventType
from service.events import build_event, read_event

MOMENTS = [
    datetime(2026, 11, 26, 21, 8, 54, 475659, tzinfo=UTC),
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),  # no microseconds: isoformat leaves them out
    datetime(2026, 6, 1, 12, 0, 0, 1, tzinfo=timezone(timedelta(hours=2))),
]
DATA: list[dict[str, Any]] = [
    {},
    {"tenant_id": "t-1", "slug": "acme", "state": "provisioning", "attempt_number": 2},
    {"output": {"bucket": "s3://acme", "sizes": [1, 2.5, None, True]}, "note": 'ünïcødé ✓ "q"'},
    {"when": datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=UTC), "nested": {"at": [MOMENTS[2]]}},
]


def library_body(
    event_id: str, event_type: EventType, subject: str | None, data: Any, at: datetime
) -> str:
    attributes: dict[str, Any] = {
        "id": event_id,
        "source": EVENT_SOURCE,
        "type": event_type.value,
        "time": at,
        "datacontenttype": "application/json",
    }
    if subject:
        attributes["subject"] = subject
    return JSONFormat().write(CloudEvent(attributes, data)).decode("utf-8")


@pytest.mark.parametrize("at", MOMENTS)
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("subject", ["acme-corp", None, ""])
def test_an_event_is_the_librarys_byte_for_byte(
    at: datetime, data: dict[str, Any], subject: str | None
) -> None:
    for event_type in (EventType.STEP_COMPLETED, EventType.COMMAND_REJECTED):
        event_id, body = build_event(event_type, subject, data, time=at)
        assert body == library_body(event_id, event_type, subject, data, at)
        read = read_event(body)
        assert read["id"] == event_id
        assert read["specversion"] == "1.0"
        assert read["type"] == event_type.value
        assert read["time"] == at
        assert ("subject" in read) is bool(subject)


def test_an_event_without_a_time_is_stamped_now_in_utc() -> None:
    before = datetime.now(UTC)
    _, body = build_event(EventType.STARTED, "acme", {"a": 1})
    stamped = read_event(body)["time"]
    assert before <= stamped <= datetime.now(UTC)
    assert json.loads(body)["time"].endswith("Z")


def test_every_event_gets_its_own_id() -> None:
    ids = {build_event(EventType.STARTED, "acme", {})[0] for _ in range(1000)}
    assert len(ids) == 1000


def test_a_time_without_an_offset_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        build_event(EventType.STARTED, "acme", {}, time=datetime(2026, 1, 1))


def test_data_that_is_not_json_is_refused() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        build_event(EventType.STARTED, "acme", {"bad": object()})
