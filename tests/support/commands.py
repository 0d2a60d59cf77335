"""Publish commands the way a platform service does: a CloudEvent on ``tenant.commands``."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from service.publisher import Publisher


def command_body(
    command_type: str, slug: str, command_id: str | None = None, **data: Any
) -> tuple[str, str]:
    command_id = command_id or str(uuid.uuid4())
    body = {
        "specversion": "1.0",
        "id": command_id,
        "source": "urn:tests:platform",
        "type": command_type,
        "time": datetime.now(UTC).isoformat(),
        "subject": slug,
        "data": {"slug": slug, "requested_by": "platform-tests", **data},
    }
    return command_id, json.dumps(body)


def send(
    publisher: Publisher,
    command_type: str,
    slug: str,
    command_id: str | None = None,
    content_type: str = "application/cloudevents+json",
    **data: Any,
) -> str:
    command_id, body = command_body(command_type, slug, command_id, **data)
    publisher.publish_command(command_type, body, content_type)
    return command_id
