"""Commands carrying a NUL character (JSON ``\\u0000``) are refused ``malformed``, kept and
answered, and never handed back to the broker.

PostgreSQL text cannot hold NUL: such a command's id, type or slug could not be recorded, the
listener requeued it, and it came back for ever (found by the hostile-input chaos test). The
listener is driven in-process with stand-in messages, so the test sees ack or requeue directly.
"""

from __future__ import annotations

import json
import uuid

import pytest
from sqlmodel import Session, col, select

from service.bootstrap import Container
from service.db.models import DeadLetter, ProcessedCommand
from service.listener import CommandListener
from tests.support.commands import command_body

pytestmark = pytest.mark.integration


class StandInMessage:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.content_type = "application/cloudevents+json"
        self.delivery_info: dict[str, object] = {}  # a first delivery
        self.headers: dict[str, object] = {}
        self.acked = False
        self.requeued = False

    def ack(self) -> None:
        self.acked = True

    def requeue(self) -> None:
        self.requeued = True


def envelope(**fields: object) -> bytes:
    body: dict[str, object] = {
        "specversion": "1.0",
        "id": f"nul-{uuid.uuid4()}",
        "source": "urn:tests",
        "type": "tenant.reset_requested",
        "data": {"slug": "nul-tenant"},
    }
    body.update(fields)
    return json.dumps(body).encode()


def test_nul_characters_are_malformed_not_poison(
    services: Container,
) -> None:
    marker = uuid.uuid4().hex[:8]
    ids = [f"nul-id-{marker}\u0000x", f"nul-type-{marker}", f"nul-slug-{marker}", f"ok-{marker}"]
    valid = command_body("tenant.reset_requested", f"nobody-{marker}", ids[3])[1].encode()
    messages = [
        StandInMessage(envelope(id=ids[0])),
        StandInMessage(envelope(id=ids[1], type="tenant.\u0000reset")),
        StandInMessage(  # a well-formed provision, but for a slug PostgreSQL cannot store
            envelope(
                id=ids[2],
                type="tenant.provision_requested",
                data={"slug": f"acme\u0000{marker}", "plan": "pro"},
            )
        ),
        StandInMessage(valid),
    ]
    listener = CommandListener(services.settings.broker_url, services.handlers)
    for message in messages:
        listener.on_message(message)
    assert [(m.acked, m.requeued) for m in messages] == [(True, False)] * 4

    stored_ids = [ids[0].replace("\u0000", "\ufffd"), *ids[1:]]
    with Session(services.engine) as session:
        rows = {
            r.command_id: r
            for r in session.exec(
                select(ProcessedCommand).where(col(ProcessedCommand.command_id).in_(stored_ids))
            )
        }
        dead = session.exec(select(DeadLetter).where(col(DeadLetter.body).contains(marker))).all()
    assert {i: (rows[i].outcome, rows[i].reason) for i in stored_ids} == {
        stored_ids[0]: ("rejected", "malformed"),
        stored_ids[1]: ("rejected", "malformed"),
        stored_ids[2]: ("rejected", "malformed"),
        stored_ids[3]: ("rejected", "unknown_tenant"),
    }
    assert len(dead) == 3
