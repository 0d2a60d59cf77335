"""An exception from another library fails an attempt cleanly, with a reason.

redis-py 8 gives its exceptions an ``error_type`` attribute that is an enum, not a string: the
failed event once tried to carry it, could not be serialised, and the attempt stayed running with
no worker on it (found by the Redis-restart chaos test). The dispatcher failing to send the chain
is the shortest way to make ``fail_attempt`` handle such an exception.
"""

from __future__ import annotations

import json

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlmodel import Session, select

from sagas.messages import CommandType
from service.bootstrap import Container, build_container
from service.db.models import OutboxEvent
from service.dispatch import AttemptRef, DecommissionRef, StepTenant
from service.handlers import Request
from tests.support.events import new_slug
from tests.support.outcome import outcomes

pytestmark = pytest.mark.integration


class BrokenBroker:
    def start_attempt(self, ref: AttemptRef, steps: list[str], tenant: StepTenant) -> None:
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    def start_decommission(self, ref: DecommissionRef, compensations: list[str]) -> None:
        raise AssertionError("not used")


def test_a_redis_error_fails_the_attempt_with_its_type_as_a_string(services: Container) -> None:
    assert not isinstance(getattr(RedisConnectionError("x"), "error_type", ""), str)
    broken = build_container(services.settings, dispatcher=BrokenBroker(), run_migrations=False)
    slug = new_slug("foreign")
    outcome = broken.handlers.create(Request(CommandType.PROVISION, slug), plan="pro")
    assert outcome.accepted  # the command was taken; the attempt it started failed at once
    final = outcomes(services.engine, [slug])[slug]
    assert (final.state, final.failure_reason) == ("failed", "step_failed")
    assert final.attempts == [(1, "failed")]
    with Session(services.engine) as session:
        body = session.exec(
            select(OutboxEvent.body)
            .where(OutboxEvent.subject == slug)
            .where(OutboxEvent.type == "tenant.provisioning.failed")
        ).one()
    details = json.loads(body)["data"]["details"]
    assert details["error_type"] == "ConnectionError"
    assert "Connection refused" in details["message"]
    assert not services.locks.is_held(slug)
    broken.publisher.close()
