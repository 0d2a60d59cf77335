"""Publisher processes for command storms (spawned: each imports this module afresh)."""

from __future__ import annotations

from service.publisher import Publisher
from tests.support.commands import command_body


def publish_retries(broker_url: str, slug: str, command_ids: list[str]) -> int:
    """Publish one ``tenant.retry_requested`` per id, as fast as one connection goes."""
    publisher = Publisher(broker_url)
    try:
        for command_id in command_ids:
            _, body = command_body("tenant.retry_requested", slug, command_id)
            publisher.publish_command("tenant.retry_requested", body)
    finally:
        publisher.close()
    return len(command_ids)
