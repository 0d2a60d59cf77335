"""kombu's Redis transport without its one lossy moment: the pop.

kombu takes a message with ``BRPOP``: it leaves the queue when Redis answers, and enters the
"unacked" hash only once the client has read the answer. A consumer killed in between (Redis may
answer a socket whose process just died) loses that message; the chaos tests lost one that way.
This transport takes it with ``BLMOVE`` into a per-queue *processing* list instead, and moves it
from there into the unacked hash in the one script (atomic, as kombu's ``MULTI`` is) that records
the delivery, so a message is always in exactly one of: the queue, the processing list, the
unacked hash. Recording a delivery and acknowledging one are each a single ``EVALSHA`` here, where
a ``MULTI`` pipeline sent five commands and parsed five replies (four for an ack):
docs/benchmarks.md, round 5.

A message left in the processing list (its consumer died right after the move) is put back on
its queue by any consumer of that queue once it has sat there for ``PROCESSING_STALE_S``;
a live consumer's message stays there for microseconds. Only a channel consuming exactly one
queue (every consumer here does) uses ``BLMOVE``; others fall back to kombu's ``BRPOP``.

``BLMOVE`` reads one list, the queue's priority-0 list; a message sent with another priority (we
send none; a foreign publisher might) is moved onto it by the same periodic pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from kombu import Connection
from kombu.exceptions import ContentDisallowed
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from config.keys import PROCESSING_STALE_S, processing_key

log = structlog.get_logger(__name__)

TRANSPORT = "service.reliable_redis:Transport"
# At most this many stale messages put back, or stray priority messages moved, per pass.
PASS_LIMIT = 1000
PASS_EVERY_S = 1.0
ACK_CHUNK = 1000

_MOVE_BACK = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
# A delivery recorded: out of the processing list and into the unacked index and hash, at once
# (a script is atomic, as kombu's MULTI is). One command to encode and one reply to parse where
# the MULTI pipeline had five of each: the pipeline was half of the audit consumer's profile.
_RECORD_DELIVERY = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('LREM', KEYS[3], 1, ARGV[4])
return 1
"""
# An acknowledgement: kombu's ZREM and HDEL, as one command.
_FORGET_DELIVERIES = """
redis.call('ZREM', KEYS[1], unpack(ARGV))
redis.call('HDEL', KEYS[2], unpack(ARGV))
return 1
"""


def transport_for(broker_url: str) -> str | None:
    """The transport to give kombu or Celery for this broker URL (None: kombu's choice)."""
    return TRANSPORT if broker_url.startswith(("redis://", "rediss://")) else None


def consumer_connection(broker_url: str, transport_options: dict[str, object]) -> Connection:
    """A kombu connection for a consumer: on Redis, through this transport."""
    return Connection(
        broker_url, transport=transport_for(broker_url), transport_options=transport_options
    )


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    def append(self, message: Any, delivery_tag: Any) -> None:
        inflight = self.channel.take_inflight()
        if inflight is None:
            super().append(message, delivery_tag)
            return
        key, item = inflight
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        self.channel.run_script(
            _RECORD_DELIVERY,
            [self.unacked_index_key, self.unacked_key, key],
            [delivery_tag, time.time(), record, item],
        )
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        self.ack_many([delivery_tag])

    def ack_many(self, delivery_tags: list[Any]) -> None:
        """Acknowledge a batch in one round trip (kombu acknowledges one message per trip)."""
        if not delivery_tags:
            return
        keys = [self.unacked_index_key, self.unacked_key]
        # Chunked: a script's unpack() is bounded by Lua's stack (8,000 values).
        for start in range(0, len(delivery_tags), ACK_CHUNK):
            self.channel.run_script(
                _FORGET_DELIVERIES, keys, delivery_tags[start : start + ACK_CHUNK]
            )
        for tag in delivery_tags:
            virtual.QoS.ack(self, tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        try:
            self.channel.restore_stale_processing()
        except self.channel.connection_errors:
            raise
        except Exception:
            log.exception("reliable_redis.restore_failed")
        return super().restore_visible(*args, **kwargs)


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._moving_from: str | None = None
        self._inflight: tuple[str, bytes] | None = None
        self._commands: tuple[Any, Any] | None = None
        self._scripts: dict[str, Any] = {}
        self._last_pass = float("-inf")
        # When this channel first saw each message in a processing list: {key: {item: t}}.
        self._first_seen: dict[str, dict[bytes, float]] = {}

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # kombu builds a new redis-py client for every command it sends outside the poll (each
        # delivery's record, each ack): a third of a consumer's time. One per channel and pool
        # does the same work; a new pool (after a fork, a reconnection) gets a new client.
        if client:
            yield client
            return
        pool = self.pool
        if self._commands is None or self._commands[0] is not pool:
            self._commands = (pool, self._create_client())
        yield self._commands[1]

    def run_script(self, source: str, keys: list[Any], args: list[Any]) -> Any:
        """``EVALSHA`` on this channel's command client (``EVAL`` once, on a server that does
        not know the script yet: a new one, or one restarted empty)."""
        with self.conn_or_acquire() as client:
            script = self._scripts.get(source)
            if script is None or script.registered_client is not client:
                script = self._scripts[source] = client.register_script(source)
            return script(keys=keys, args=args)

    def take_inflight(self) -> tuple[str, bytes] | None:
        inflight, self._inflight = self._inflight, None
        return inflight

    # --- delivery ---
    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if len(queues) != 1 or self.global_keyprefix:
            self._moving_from = None
            super()._brpop_start(timeout)
            return
        queue = queues[0]
        self._moving_from = queue
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        wait = self.brpop_timeout if timeout is None else timeout
        self.client.connection.send_command(
            "BLMOVE", queue, processing_key(queue), "RIGHT", "LEFT", wait or 0
        )

    def _brpop_read(self, **options: Any) -> bool:
        queue, self._moving_from = self._moving_from, None
        if queue is None:
            return bool(super()._brpop_read(**options))
        try:
            try:
                item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if item is None:
                raise virtual.Empty()
            self._deliver_moved(queue, item)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _deliver_moved(self, queue: str, item: bytes) -> None:
        key = processing_key(queue)
        try:
            payload = loads(bytes_to_str(item))
        except (ValueError, TypeError, ContentDisallowed):
            # Not a kombu message at all (someone pushed raw bytes onto the list): keep it aside,
            # where an operator can read it, rather than put it back for ever.
            with self.conn_or_acquire() as client:
                client.pipeline().lrem(key, 1, item).rpush(f"{key}:unreadable", item).execute()
            log.error("reliable_redis.unreadable_message", queue=queue, kept_in=f"{key}:unreadable")
            return
        self._inflight = (key, item)
        self.connection._deliver(payload, queue)
        if self.take_inflight() is not None:
            # Delivered without our QoS recording it (kombu requeued it: no consumer for the
            # queue): it is back on the queue, so it must leave the processing list.
            with self.conn_or_acquire() as client:
                client.lrem(key, 1, item)

    def _poll_error(self, type: str, **options: Any) -> Any:
        if type == "BRPOP" and self._moving_from is not None:
            # Read (and drop) the reply: a message it carried is in the processing list and
            # goes back to its queue once stale.
            self._moving_from = None
            return self.client.parse_response(self.client.connection, "BLMOVE")
        return super()._poll_error(type, **options)

    # --- the periodic pass (kombu calls restore_visible on every consumer, every few seconds) ---
    def restore_stale_processing(self) -> None:
        now = time.monotonic()
        # kombu calls this on every idle poll of a drain_events() consumer: a few times a second
        # is plenty for a 5 s staleness.
        if now - self._last_pass < PASS_EVERY_S:
            return
        self._last_pass = now
        with self.conn_or_acquire() as client:
            for queue in list(self.active_queues):
                self._put_back_stale(client, queue, now)
                self._gather_other_priorities(client, queue)

    def _put_back_stale(self, client: Any, queue: str, now: float) -> None:
        key = processing_key(queue)
        items = client.lrange(key, 0, PASS_LIMIT - 1)
        seen = self._first_seen.setdefault(key, {})
        for gone in set(seen) - set(items):
            del seen[gone]
        for item in items:
            if now - seen.setdefault(item, now) < PROCESSING_STALE_S:
                continue
            del seen[item]
            if client.eval(_MOVE_BACK, 2, key, queue, item):
                log.warning("reliable_redis.message_put_back", queue=queue)

    def _gather_other_priorities(self, client: Any, queue: str) -> None:
        for priority in self.priority_steps:
            source = self._q_for_pri(queue, priority)
            if source == queue:
                continue
            for _ in range(PASS_LIMIT):
                if client.lmove(source, queue, "RIGHT", "RIGHT") is None:
                    break


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel
