"""The command listener: ``provisioner.commands`` -> handlers, acknowledged after commit.

A message it cannot understand is kept (dead-letter row) and answered with
``tenant.command.rejected`` (reason ``malformed``) in one transaction, then acknowledged: it is
never lost and never stops the listener. If the database itself is down, the message is handed
back to the broker (requeued) instead, so nothing is acknowledged that was not recorded.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import astuple
from typing import Any

import structlog
from kombu import Consumer, Message

from config.keys import consumer_transport_options
from sagas.errors import MalformedCommand
from sagas.messages import Command, CommandType, Salvage, parse_command, salvage
from service.dead_letters import dead_letter_of, redelivered
from service.handlers import Handlers, Outcome, Request
from service.publisher import COMMANDS_QUEUE_DECL, EVENTS
from service.reliable_redis import consumer_connection

log = structlog.get_logger(__name__)

PREFETCH = 10
MAX_HANDLING_FAILURES = 5


def handle_command(handlers: Handlers, command: Command) -> Outcome:
    data: Any = command.data
    request = Request(
        command_type=command.type,
        slug=command.slug,
        requested_by=data.requested_by,
        command_id=command.id,
        reason=data.reason,
    )
    if command.type is CommandType.PROVISION:
        return handlers.create(request, plan=data.plan, admin_email=data.admin_email)
    if command.type is CommandType.RETRY:
        return handlers.retry(request, force=data.force)
    if command.type is CommandType.RESET:
        return handlers.reset(request)
    return handlers.decommission(request)


def _without_nul(text: str) -> str:
    return text.replace("\x00", "\ufffd")


def refuse_nul(command: Command) -> None:
    """A NUL character (JSON ``\\u0000``) in any field makes the command malformed: PostgreSQL
    text cannot hold one, so such a command could be neither acted on nor recorded, and would
    come back from the broker for ever."""
    fields = [command.id, *command.data.model_dump().values()]
    if any(isinstance(value, str) and "\x00" in value for value in fields):
        raise MalformedCommand("a field contains a NUL character (\\u0000)")


def storable(seen: Salvage) -> Salvage:
    """What was salvaged from a malformed command, fit for the database (NUL replaced)."""
    return Salvage(*(None if value is None else _without_nul(value) for value in astuple(seen)))


class CommandListener:
    def __init__(self, broker_url: str, handlers: Handlers) -> None:
        self._broker_url = broker_url
        self._handlers = handlers
        self._failures: dict[str, int] = {}
        self.handled = 0

    def on_message(self, message: Message) -> None:
        body: bytes = (
            message.body if isinstance(message.body, bytes) else str(message.body).encode()
        )
        content_type = message.content_type
        try:
            try:
                command = parse_command(body, content_type)
                refuse_nul(command)
            except MalformedCommand as exc:
                seen = storable(salvage(body))
                error = _without_nul(str(exc))
                kept = dead_letter_of(body, content_type, error, "listener")
                if redelivered(message) and self._handlers.dead_letter_kept(kept):
                    # Kept and answered before a crash kept it from being acknowledged: a
                    # malformed command has no id to dedupe on, its bytes are what we have.
                    log.info("listener.malformed_redelivery_ignored", slug=seen.slug)
                    message.ack()
                    return
                outcome = self._handlers.reject_malformed(
                    command_id=seen.command_id,
                    command_type=seen.command_type,
                    slug=seen.slug,
                    message=error,
                    dead_letter=kept,
                )
            else:
                outcome = handle_command(self._handlers, command)
        except Exception as exc:
            log.exception("listener.handling_failed")
            if not self._give_up_on(body, content_type, exc):
                # Not recorded anywhere yet: give it back, and slow down so that a database
                # outage does not spin.
                message.requeue()
                time.sleep(1.0)
                return
            outcome = None
        message.ack()
        self.handled += 1
        if outcome is None:
            return
        log.info(
            "listener.handled",
            command_type=outcome.command_type,
            slug=outcome.slug,
            accepted=outcome.accepted,
            reason=outcome.reason,
            duplicate=outcome.duplicate,
        )

    def _give_up_on(self, body: bytes, content_type: str | None, exc: Exception) -> bool:
        """After ``MAX_HANDLING_FAILURES`` failures of one message (a poison message, not an
        outage), keep it as a dead letter and answer it, so it cannot block the queue."""
        digest = hashlib.sha256(body).hexdigest()
        self._failures[digest] = self._failures.get(digest, 0) + 1
        if self._failures[digest] < MAX_HANDLING_FAILURES:
            return False
        error = _without_nul(f"could not be handled after {MAX_HANDLING_FAILURES} tries: {exc}")
        error = error[:1000]
        seen = storable(salvage(body))
        try:
            self._handlers.reject_malformed(
                command_id=None,
                command_type=seen.command_type,
                slug=seen.slug,
                message=error,
                dead_letter=dead_letter_of(body, content_type, error, "listener"),
            )
        except Exception:
            log.exception("listener.dead_letter_failed")
            return False
        del self._failures[digest]
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with consumer_connection(
                    self._broker_url, consumer_transport_options("listener")
                ) as connection:
                    channel = connection.default_channel
                    EVENTS.bind(channel).declare()
                    queue = COMMANDS_QUEUE_DECL.bind(channel)
                    queue.declare()
                    with Consumer(
                        channel,
                        queues=[queue],
                        on_message=self.on_message,
                        prefetch_count=PREFETCH,
                        accept=None,
                    ):
                        log.info("listener.started", queue=queue.name)
                        while not stop.is_set():
                            try:
                                connection.drain_events(timeout=0.5)
                            except TimeoutError:
                                continue
            except Exception as exc:
                if stop.is_set():
                    break
                log.warning("listener.connection_lost", error=str(exc))
                stop.wait(1.0)
        log.info("listener.stopped")
