"""Publish to the ``tenant.*`` topic exchanges with kombu.

Every publish declares the exchange first: on the Redis transport kombu keeps an exchange's
type in the publishing process, and an undeclared exchange routes as direct (the contract).
On Redis, a call's messages go out in one round trip (service/routed_publish.py); elsewhere, or
when that fails, through kombu's ``Producer.publish``, retrying.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, cast

import structlog
from kombu import Connection, Exchange, Producer, Queue

from config.keys import (
    AUDIT_QUEUE,
    CLOUDEVENTS_CONTENT_TYPE,
    COMMANDS_EXCHANGE,
    COMMANDS_QUEUE,
    EVENTS_EXCHANGE,
)
from service import held_publishes
from service.held_publishes import HELD, Held
from service.reliable_redis import transport_for
from service.routed_publish import Batch, NotRoutedHere, Outgoing, RoutedPublish

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
            self._local.routed = _routed_publish(producer.channel)
        return producer

    def publish_events(
        self,
        events: Iterable[tuple[str, str]],
        *,
        on_sent: Callable[[], None] | None = None,
        with_next_message: bool = False,
    ) -> None:
        """Publish ``(routing_key, body)`` pairs to ``tenant.events``, in order; then call
        ``on_sent``. ``with_next_message``: while this thread holds (service/held_publishes.py),
        they may go out with the thread's next task message instead, ``on_sent`` once they did."""
        pending = list(events)
        if with_next_message and HELD.holding():
            batch = self._batch(EVENTS, pending)
            if batch is not None:
                HELD.hold(Held(batch, on_sent))
                return
        # Whatever is held goes first: the events' order is the order they were asked for in.
        held_publishes.send(HELD.take())
        self._publish(EVENTS, pending)
        if on_sent is not None:
            on_sent()

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
        if not pending:
            return
        content_type = content_type or CLOUDEVENTS_CONTENT_TYPE
        try:
            routed = self._routed()
            if routed is not None:
                # On Redis, all of them in one round trip (service/routed_publish.py).
                routed.publish(
                    exchange.name,
                    [Outgoing(key, body.encode("utf-8"), content_type) for key, body in pending],
                )
                return
        except NotRoutedHere as exc:
            log.info("publish.through_kombu", reason=str(exc))
        except Exception as exc:
            # Delivery is uncertain (the script may have run): send them again through kombu,
            # retrying, on a new connection; consumers dedup on the CloudEvent id.
            log.info("publish.batch_failed", error=str(exc)[:200], messages=len(pending))
            self.close()
        self._send(exchange, pending, content_type)

    def _batch(self, exchange: Exchange, messages: list[tuple[str, str]]) -> Batch | None:
        """``messages`` built for one script (None: this connection has no such publishing)."""
        try:
            routed = self._routed()
            if routed is None:
                return None
            name = exchange.name
            outgoing = [
                Outgoing(key, body.encode("utf-8"), CLOUDEVENTS_CONTENT_TYPE)
                for key, body in messages
            ]
            return routed.prepare(name, [routed.build(name, one) for one in outgoing])
        except Exception as exc:
            # Not held, then: published now, with kombu's retries where it comes to that.
            log.info("publish.not_held", reason=str(exc)[:200])
            return None

    def _routed(self) -> RoutedPublish | None:
        channel = self._producer().channel
        routed: RoutedPublish | None = self._local.routed
        if routed is not None and not routed.serves(channel):
            # kombu's retry revived the connection on a new channel.
            routed = self._local.routed = _routed_publish(channel)
        return routed

    def _send(self, exchange: Exchange, messages: list[tuple[str, str]], content_type: str) -> None:
        try:
            producer = self._producer()
            for routing_key, body in messages:
                producer.publish(
                    body.encode("utf-8"),
                    exchange=exchange,
                    routing_key=routing_key,
                    content_type=content_type,
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
                self._local.routed = None


def _routed_publish(channel: Any) -> RoutedPublish | None:
    """The channel's one-round-trip publishing, where it has one (the service's Redis transport)."""
    routed = getattr(channel, "routed_publish", None)
    return None if routed is None else cast(RoutedPublish | None, routed())
