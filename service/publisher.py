"""Publish to the ``tenant.*`` topic exchanges with kombu.

Every publish declares the exchange first: on the Redis transport kombu keeps an exchange's
type in the publishing process, and an undeclared exchange routes as direct (the contract).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import structlog
from kombu import Connection, Exchange, Producer, Queue

from config.keys import (
    AUDIT_QUEUE,
    CLOUDEVENTS_CONTENT_TYPE,
    COMMANDS_EXCHANGE,
    COMMANDS_QUEUE,
    EVENTS_EXCHANGE,
)
from service.reliable_redis import transport_for

EVENTS = Exchange(EVENTS_EXCHANGE, type="topic", durable=True)
COMMANDS = Exchange(COMMANDS_EXCHANGE, type="topic", durable=True)
COMMANDS_QUEUE_DECL = Queue(COMMANDS_QUEUE, exchange=COMMANDS, routing_key="#", durable=True)
AUDIT_QUEUE_DECL = Queue(AUDIT_QUEUE, exchange=EVENTS, routing_key="#", durable=True)

log = structlog.get_logger(__name__)

PUBLISH_RETRY_POLICY = {"max_retries": 5, "interval_start": 0.1, "interval_step": 0.5}


class Publisher:
    """One connection per process (kombu connections are not shared across threads)."""

    def __init__(self, broker_url: str) -> None:
        self._broker_url = broker_url
        self._local = threading.local()

    def _producer(self) -> Producer:
        producer: Producer | None = getattr(self._local, "producer", None)
        if producer is None:
            # On Redis, the service's own transport: one redis-py client per channel, where
            # kombu's builds one for every command (the table lookup, each batch): a third of a
            # publish's cost (docs/benchmarks.md).
            connection = Connection(self._broker_url, transport=transport_for(self._broker_url))
            producer = Producer(connection.default_channel)
            # Declare both exchanges and our own durable queues once per connection, so a
            # message published before the listener or the audit consumer first ran is kept.
            for entity in (EVENTS, COMMANDS, COMMANDS_QUEUE_DECL, AUDIT_QUEUE_DECL):
                entity.bind(producer.channel).declare()
            self._local.connection = connection
            self._local.producer = producer
        return producer

    def publish_events(self, events: Iterable[tuple[str, str]]) -> None:
        """Publish ``(routing_key, body)`` pairs to ``tenant.events``, in order."""
        self._publish(EVENTS, events)

    def publish_command(
        self, command_type: str, body: str, content_type: str | None = None
    ) -> None:
        self._publish(COMMANDS, [(command_type, body)], content_type)

    def _publish(
        self,
        exchange: Exchange,
        messages: Iterable[tuple[str, str]],
        content_type: str | None = None,
    ) -> None:
        pending = list(messages)
        if len(pending) > 1:
            try:
                # One pipeline for the pushes of all the messages (kombu's Redis transport; the
                # others publish at once): a step's two events cost one round trip, not two.
                self._send(exchange, pending, content_type, batch=True)
                return
            except Exception as exc:
                # Delivery is uncertain (a pipeline that failed may have run in part): send
                # them again one by one, retrying; consumers dedup on the CloudEvent id.
                log.info("publish.batch_failed", error=str(exc)[:200], messages=len(pending))
        self._send(exchange, pending, content_type, batch=False)

    def _send(
        self,
        exchange: Exchange,
        messages: list[tuple[str, str]],
        content_type: str | None,
        *,
        batch: bool,
    ) -> None:
        try:
            producer = self._producer()
            with (
                producer.batch() if batch else nullcontext(),
                _bindings_read_once(producer.channel) if batch else nullcontext(),
            ):
                for routing_key, body in messages:
                    producer.publish(
                        body.encode("utf-8"),
                        exchange=exchange,
                        routing_key=routing_key,
                        content_type=content_type or CLOUDEVENTS_CONTENT_TYPE,
                        content_encoding="utf-8",
                        delivery_mode=2,
                        retry=True,
                        retry_policy=PUBLISH_RETRY_POLICY,
                    )
        except Exception:
            # A broken connection must not be reused by the next publish.
            self.close()
            raise

    def close(self) -> None:
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            try:
                connection.release()
            finally:
                self._local.connection = None
                self._local.producer = None


@contextmanager
def _bindings_read_once(channel: Any) -> Iterator[None]:
    """kombu's Redis transport reads an exchange's binding table (``SMEMBERS``) for every
    message; the messages of one batch are routed by one reading of it, as if they had been
    published at its first message's moment. Kept no longer than the batch, so a queue bound
    a moment ago (a downstream consumer's) is never missed by a later publish."""
    read = getattr(channel, "get_table", None)
    if read is None:  # not a virtual transport: the broker routes
        yield
        return
    tables: dict[str, Any] = {}

    def read_once(exchange: str) -> Any:
        if exchange not in tables:
            tables[exchange] = read(exchange)
        return tables[exchange]

    channel.get_table = read_once
    try:
        yield
    finally:
        del channel.get_table  # the transport's own method again
