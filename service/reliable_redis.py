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

When the queue holds more than the message just delivered (the record's script answers the
queue's length), the next poll *takes* instead: one script pops as many messages as the consumer's
prefetch has room for (at most ``TAKE_MAX``) and records each as delivered, so that a backlog costs
one round trip per batch instead of two per message. A take that comes back short means the
queue is empty: the poll after it blocks on ``BLMOVE`` again. Taken messages go from the queue
straight into the unacked hash, in one script: still always in exactly one place.

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
from service import held_publishes
from service.held_publishes import HELD, Held
from service.routed_publish import NotRoutedHere, RoutedPublish

log = structlog.get_logger(__name__)

TRANSPORT = "service.reliable_redis:Transport"
# At most this many stale messages put back, or stray priority messages moved, per pass.
PASS_LIMIT = 1000
PASS_EVERY_S = 1.0
ACK_CHUNK = 1000
# At most this many messages per take: the consumer's prefetch bounds it too.
TAKE_MAX = 100

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
# It answers how many messages wait behind this one: more than none, and the next poll takes.
_RECORD_DELIVERY = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('LREM', KEYS[3], 1, ARGV[4])
return redis.call('LLEN', KEYS[4])
"""
# A take: up to ARGV[1] messages off the queue (KEYS[1]), oldest first, each recorded as kombu's
# QoS records a delivery: its tag in the index (KEYS[2]) at ARGV[2], and in the hash (KEYS[3])
# the JSON array [message, exchange, routing_key] that kombu's restore reads. A message without
# a delivery tag (not a kombu message) is kept aside in KEYS[4]. Answers {how many were kept
# aside, tag, message, tag, message, ...}.
_TAKE = """
local items = redis.call('RPOP', KEYS[1], ARGV[1])
if not items then return {0} end
local taken, unreadable = {0}, 0
for _, item in ipairs(items) do
  local ok, message = pcall(cjson.decode, item)
  local properties = ok and type(message) == 'table' and message.properties
  local tag = type(properties) == 'table' and properties.delivery_tag
  if type(tag) == 'string' then
    local info = properties.delivery_info
    if type(info) ~= 'table' then info = {} end
    redis.call('ZADD', KEYS[2], ARGV[2], tag)
    redis.call('HSET', KEYS[3], tag, '[' .. item .. ',' .. cjson.encode(info.exchange) .. ','
      .. cjson.encode(info.routing_key) .. ']')
    taken[#taken + 1] = tag
    taken[#taken + 1] = item
  else
    redis.call('RPUSH', KEYS[4], item)
    unreadable = unreadable + 1
  end
end
taken[1] = unreadable
return taken
"""
# Taken messages that were not handed to the consumer (it raised): out of the unacked index and
# hash and back onto the queue's consuming end, oldest last, so that they come next in order.
# ARGV: tag, message, tag, message, ... oldest first.
_PUT_BACK_TAKEN = """
for i = #ARGV - 1, 1, -2 do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('RPUSH', KEYS[3], ARGV[i + 1])
end
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


# The message being delivered was taken, and recorded by the take's script already.
_RECORDED = ("", b"")


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    def append(self, message: Any, delivery_tag: Any) -> None:
        inflight = self.channel.take_inflight()
        if inflight is None:
            super().append(message, delivery_tag)
            return
        if inflight is not _RECORDED:
            queue, item = inflight
            delivery = message.delivery_info
            record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
            waiting = self.channel.run_script(
                _RECORD_DELIVERY,
                [self.unacked_index_key, self.unacked_key, processing_key(queue), queue],
                [delivery_tag, time.time(), record, item],
            )
            self.channel.note_backlog(int(waiting) > 0)
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        self.ack_many([delivery_tag])

    def forget_taken(self, delivery_tags: list[Any]) -> None:
        """Drop the records of taken messages that no acknowledgement will clear."""
        self.channel.run_script(
            _FORGET_DELIVERIES, [self.unacked_index_key, self.unacked_key], delivery_tags
        )

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
        self._taking: tuple[str, int] | None = None  # (queue, how many asked) of a take in flight
        self._backlog = False  # the last delivery left messages on the queue
        self._inflight: tuple[str, bytes] | None = None
        self._commands: tuple[Any, Any] | None = None
        self._scripts: dict[str, Any] = {}
        self._last_pass = float("-inf")
        # When this channel first saw each message in a processing list: {key: {item: t}}.
        self._first_seen: dict[str, dict[bytes, float]] = {}
        self._routed: RoutedPublish | None = None
        self._routing_refused = False  # kombu's publish only (RoutedPublish refused the channel)

    # --- publishing ---
    def routed_publish(self) -> RoutedPublish | None:
        """This channel's one-round-trip publishing (service/routed_publish.py), if it can."""
        if self._routed is None and not self._routing_refused:
            try:
                self._routed = RoutedPublish(self)
            except NotRoutedHere:
                self._routing_refused = True
        return self._routed

    def basic_publish(self, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> Any:
        # kombu reads a named exchange's bindings for every message, then pushes it: two round
        # trips; one here. kombu's own publish batch routes as kombu. Events this thread holds
        # (service/held_publishes.py) go first, in the same script.
        held = HELD.take()
        # To the nameless exchange (Celery's task messages), kombu pushes with one LPUSH: a
        # script is only worth it to carry what is held.
        routed = self.routed_publish() if exchange or held else None
        try:
            if routed is None or "_publish_batch" in kwargs:
                held = _send_apart(held)
                return super().basic_publish(message, exchange, routing_key, **kwargs)
            self._inplace_augment_message(message, exchange, routing_key)
            try:
                batch = routed.prepare(exchange, [(routing_key, message)])
                routed.push_together([item.batch for item in held] + [batch])
            except NotRoutedHere:
                held = _send_apart(held)
                # What kombu's basic_publish does once the message is augmented.
                if not exchange:
                    return self._put(routing_key, message, **kwargs)
                return self.typeof(exchange).deliver(message, exchange, routing_key, **kwargs)
        except BaseException:
            # Nothing of this script was pushed (a script is all or none): kombu's retry of this
            # publish, or the end of the task, sends them.
            HELD.put_back(held)
            raise
        for item in held:
            item.sent()
        return None

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

    def note_backlog(self, waiting: bool) -> None:
        self._backlog = waiting

    def take_next(self) -> bool:
        """Make the next poll a take, whatever the last one found: for a consumer that let
        messages gather on the queue (the audit consumer, within its batch window). False, and
        nothing changed, when the queue still has messages or a poll is in flight."""
        if self._backlog or self._in_poll:
            return False
        self._backlog = True
        return True

    def _take_count(self) -> int:
        """How many messages the next poll should take (0: block on ``BLMOVE`` instead)."""
        if not self._backlog:
            return 0
        room = self.qos.can_consume_max_estimate()
        return TAKE_MAX if room is None else min(TAKE_MAX, room)

    # --- delivery ---
    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if len(queues) != 1 or self.global_keyprefix:
            self._moving_from = None
            super()._brpop_start(timeout)
            return
        queue = queues[0]
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        count = self._take_count()
        if count:
            self._taking = (queue, count)
            self.client.connection.send_command(
                "EVAL",
                _TAKE,
                4,
                queue,
                self.qos.unacked_index_key,
                self.qos.unacked_key,
                f"{processing_key(queue)}:unreadable",
                count,
                time.time(),
            )
            return
        self._moving_from = queue
        wait = self.brpop_timeout if timeout is None else timeout
        self.client.connection.send_command(
            "BLMOVE", queue, processing_key(queue), "RIGHT", "LEFT", wait or 0
        )

    def _brpop_read(self, **options: Any) -> bool:
        queue, self._moving_from = self._moving_from, None
        taking, self._taking = self._taking, None
        if queue is None and taking is None:
            return bool(super()._brpop_read(**options))
        command = "EVAL" if taking is not None else "BLMOVE"
        try:
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if taking is not None:
                return self._deliver_taken(*taking, reply)
            if reply is None or queue is None:
                raise virtual.Empty()
            self._deliver_moved(queue, reply)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _deliver_taken(self, queue: str, asked: int, reply: list[Any]) -> bool:
        kept_aside = int(reply[0])
        taken = list(zip(reply[1::2], reply[2::2], strict=True))  # (tag, message), oldest first
        # A short take emptied the queue: the next poll blocks on BLMOVE.
        self._backlog = len(taken) + kept_aside >= asked
        unreadable = f"{processing_key(queue)}:unreadable"
        delivered = 0
        for index, (tag, item) in enumerate(taken):
            try:
                payload = loads(bytes_to_str(item))
            except (ValueError, TypeError, ContentDisallowed):
                # The script could read it; should Python not, it is kept aside all the same
                # (and then its record dropped: a crash in between restores it, not loses it).
                with self.conn_or_acquire() as client:
                    client.rpush(unreadable, item)
                self.qos.forget_taken([tag])
                kept_aside += 1
                continue
            self._inflight = _RECORDED
            try:
                self.connection._deliver(payload, queue)
            except BaseException:
                # Not handed over (the consumer raised): this message if our QoS never saw it,
                # and the ones after it, go back to the queue, in order.
                start = index if self.take_inflight() is not None else index + 1
                self._put_back_taken(queue, taken[start:])
                raise
            delivered += 1
            if self.take_inflight() is not None:
                # Delivered without our QoS (a consumer without acknowledgements, or kombu's
                # requeue of a message no consumer wanted): no ack will ever clear its record.
                self.qos.forget_taken([tag])
        if kept_aside:
            log.error(
                "reliable_redis.unreadable_message",
                queue=queue,
                kept_in=unreadable,
                count=kept_aside,
            )
        if delivered == 0:
            raise virtual.Empty()
        return True

    def _put_back_taken(self, queue: str, taken: list[tuple[bytes, bytes]]) -> None:
        if not taken:
            return
        args = [part for pair in taken for part in pair]
        self.run_script(
            _PUT_BACK_TAKEN, [self.qos.unacked_index_key, self.qos.unacked_key, queue], args
        )

    def _deliver_moved(self, queue: str, item: bytes) -> None:
        key = processing_key(queue)
        try:
            payload = loads(bytes_to_str(item))
            if not _is_kombu_message(payload):
                raise ValueError("no delivery tag")
        except (ValueError, TypeError, ContentDisallowed):
            # Not a kombu message at all (someone pushed raw bytes, or JSON of their own, onto
            # the list): keep it aside, where an operator can read it, rather than put it back
            # for ever. The take's script keeps the same messages aside.
            with self.conn_or_acquire() as client:
                client.pipeline().lrem(key, 1, item).rpush(f"{key}:unreadable", item).execute()
            log.error("reliable_redis.unreadable_message", queue=queue, kept_in=f"{key}:unreadable")
            return
        self._inflight = (queue, item)
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
        if type == "BRPOP" and self._taking is not None:
            # Messages it took are recorded as delivered: kombu restores them to their queue
            # once the visibility timeout has passed.
            self._taking = None
            return self.client.parse_response(self.client.connection, "EVAL")
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


def _send_apart(held: list[Held]) -> list[Held]:
    """Send ``held`` in scripts of their own, before a message that cannot carry them; what is
    left to send (nothing)."""
    held_publishes.send(held)
    return []


def _is_kombu_message(payload: Any) -> bool:
    properties = payload.get("properties") if isinstance(payload, dict) else None
    return isinstance(properties, dict) and isinstance(properties.get("delivery_tag"), str)


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel
