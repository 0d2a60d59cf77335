"""Messages published to an exchange on kombu's Redis transport in one round trip.

kombu routes every message by reading the exchange's binding table (``SMEMBERS``) before pushing
it, and publishes each through ``Producer.publish`` (its retry wrapper, declarations,
serialisation registry): a saga step's two events cost two round trips and a third of the step's
own CPU (docs/benchmarks.md, round 7). Here:

- each message is built by the channel's own ``prepare_message`` and ``_inplace_augment_message``
  (kombu's format: base64 body, a uuid delivery tag, the delivery info), as kombu would;
- it is routed by the exchange's own kombu type (``typeof(exchange).lookup``) against the binding
  table as this channel last read it;
- one script checks that copy against the table and, only if they agree, pushes every message.
  When a binding was added or removed since, the script pushes nothing and answers the table:
  the batch is routed again by it. A queue bound a moment ago is never missed.

``service.reliable_redis``'s channel routes every message it publishes this way (Celery's task
messages too); ``service.publisher`` also skips ``Producer.publish`` for the events it sends.

Only what a kombu publish would do is done: no queue expiry (kombu renews it only for queues its
own channel declared with one), no key prefix, no fanout exchange. Those raise
``NotRoutedHere``, and the caller publishes through kombu instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

# KEYS[1]: the exchange's binding table; KEYS[2..]: the lists to push onto.
# ARGV[1]: n, how many bindings the batch was routed by (-1: none read yet); ARGV[2..n+1]: those
# bindings; then pairs (the list's index in KEYS, the message), in publishing order.
# Answers how many pushes it made, or, when the table is not the one routed by, {the table}.
_CHECK_AND_PUSH = """
local n = tonumber(ARGV[1])
local same = redis.call('SCARD', KEYS[1]) == n
local i = 2
while same and i <= n + 1 do
  same = redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 1
  i = i + 1
end
if not same then return {redis.call('SMEMBERS', KEYS[1])} end
for j = n + 2, #ARGV, 2 do
  redis.call('LPUSH', KEYS[tonumber(ARGV[j])], ARGV[j + 1])
end
return (#ARGV - n - 1) / 2
"""
# A table that changes under every reading this many times in a row is left to kombu's publish.
ROUTINGS = 3


class NotRoutedHere(Exception):
    """What this channel's messages need is kombu's own publish."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message as ``Producer.publish`` takes it, already serialised."""

    routing_key: str
    body: bytes
    content_type: str
    content_encoding: str = "utf-8"
    delivery_mode: int = 2


class RoutedPublish:
    """One channel's (of ``service.reliable_redis``): it holds the channel's copies of the
    binding tables, so it lives and dies with the channel."""

    def __init__(self, channel: Any) -> None:
        if getattr(channel, "global_keyprefix", ""):
            raise NotRoutedHere("a global key prefix")
        self._channel = channel
        self._tables: dict[str, _Table] = {}  # exchange -> its bindings, as last read

    def serves(self, channel: Any) -> bool:
        return channel is self._channel

    def publish(self, exchange: str, messages: Sequence[Outgoing]) -> None:
        """Publish ``messages`` to ``exchange`` in order, all or none (one script)."""
        self.push(exchange, [self._message(exchange, outgoing) for outgoing in messages])

    def push(self, exchange: str, built: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Route and push ``(routing_key, message)`` pairs, each message already as kombu's
        ``basic_publish`` makes it (``_inplace_augment_message``), all or none."""
        channel = self._channel
        kind = channel.typeof(exchange)
        if kind.type not in ("topic", "direct"):
            raise NotRoutedHere(f"a {kind.type} exchange")
        encoded = [(key, message, dumps(message)) for key, message in built]
        known = self._tables.get(exchange)
        for _ in range(ROUTINGS):
            keys, args = self._routed(exchange, kind, known, encoded)
            reply = channel.run_script(_CHECK_AND_PUSH, keys, args)
            if not isinstance(reply, list):
                return
            known = self._tables[exchange] = _Table(channel, reply[0])
        raise NotRoutedHere(f"the bindings of {exchange} changed under {ROUTINGS} routings")

    def _message(self, exchange: str, outgoing: Outgoing) -> tuple[str, dict[str, Any]]:
        channel = self._channel
        message: dict[str, Any] = channel.prepare_message(
            outgoing.body,
            0,
            outgoing.content_type,
            outgoing.content_encoding,
            {},
            {"delivery_mode": outgoing.delivery_mode},
        )
        channel._inplace_augment_message(message, exchange, outgoing.routing_key)
        return outgoing.routing_key, message

    def _routed(
        self,
        exchange: str,
        kind: Any,
        known: _Table | None,
        encoded: list[tuple[str, dict[str, Any], str]],
    ) -> tuple[list[str], list[Any]]:
        """The script's keys and arguments for ``encoded`` (routing key, message, its JSON)
        routed by ``kind`` (the exchange's kombu type) over ``known`` (None: not read yet,
        which the script answers with the table)."""
        channel = self._channel
        keys = [channel.keyprefix_queue % exchange]
        if known is None:
            return keys, [-1]
        deadletter = channel.deadletter_queue
        index: dict[str, int] = {}
        pushes: list[Any] = []
        for routing_key, message, body in encoded:
            try:
                queues = kind.lookup(known.rows, exchange, routing_key, None)
            except KeyError:  # as kombu's _lookup: an unknown exchange routes nowhere
                queues = []
            # Sorted: a message bound for several queues reaches them in the same order each
            # time (kombu's lookup answers a set).
            for queue in sorted(q for q in queues if q and q != deadletter):
                if queue in channel._expires:
                    raise NotRoutedHere(f"queue {queue} expires")
                key = channel._q_for_pri(queue, channel._get_message_priority(message, False))
                if key not in index:
                    index[key] = len(keys) + 1  # Lua counts from 1
                    keys.append(key)
                pushes += [index[key], body]
        return keys, [len(known.bindings), *known.bindings, *pushes]


class _Table:
    """An exchange's binding table as read: the raw members (what the script compares) and
    kombu's rows (routing key, pattern, queue) that its exchange types route by."""

    __slots__ = ("bindings", "rows")

    def __init__(self, channel: Any, bindings: list[bytes]) -> None:
        self.bindings = list(bindings)
        self.rows = [tuple(bytes_to_str(binding).split(channel.sep)) for binding in bindings]
