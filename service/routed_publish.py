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

``service.reliable_redis``'s channel routes every message it publishes to a named exchange this
way; ``service.publisher`` also skips ``Producer.publish`` for the events it sends.

Batches built by several channels (``prepare``) go out in one script (``push_together``), which
checks every table they were routed by: a step's events, built by the publisher's channel, ride
with the next step's task message on Celery's (service/held_publishes.py). Celery sends its task
messages to the nameless exchange, whose routing key names the queue (no table): kombu pushes
those with one ``LPUSH``, which the transport keeps unless it has events to carry.

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

# Several exchanges' messages in one script (a step's events and its next step's task message):
# KEYS[1..g]: the exchanges' binding tables; KEYS[g+1..]: the lists to push onto.
# ARGV[1]: g; then, for each table in turn, n (how many bindings its messages were routed by; -1:
# none read yet) and those n bindings; then pairs (the list's index in KEYS, the message), in
# publishing order. Answers how many pushes it made, or, when a table is not the one routed by,
# {that table's position, the table}: nothing is pushed unless every table is as routed by.
_CHECK_AND_PUSH = """
local g = tonumber(ARGV[1])
local i = 2
for t = 1, g do
  local n = tonumber(ARGV[i])
  local same = redis.call('SCARD', KEYS[t]) == n
  local j = i + 1
  while same and j <= i + n do
    same = redis.call('SISMEMBER', KEYS[t], ARGV[j]) == 1
    j = j + 1
  end
  if not same then return {t, redis.call('SMEMBERS', KEYS[t])} end
  i = i + 1 + math.max(n, 0)
end
for j = i, #ARGV, 2 do
  redis.call('LPUSH', KEYS[tonumber(ARGV[j])], ARGV[j + 1])
end
return (#ARGV - i + 1) / 2
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


@dataclass(frozen=True, slots=True)
class Batch:
    """Messages for one exchange, built by one channel's ``RoutedPublish`` (``prepare``) and
    routed against that channel's copy of the exchange's bindings when pushed."""

    routed: RoutedPublish
    exchange: str
    kind: Any  # the exchange's kombu type, as the building channel declared it (None: nameless)
    encoded: tuple[tuple[str, dict[str, Any], str], ...]  # (routing key, message, its JSON)


class RoutedPublish:
    """One channel's (of ``service.reliable_redis``): it holds the channel's copies of the
    binding tables, so it lives and dies with the channel."""

    def __init__(self, channel: Any) -> None:
        if getattr(channel, "global_keyprefix", ""):
            raise NotRoutedHere("a global key prefix")
        self._channel = channel
        self._tables: dict[str, _Table] = {}  # exchange -> its bindings, as last read
        kwargs = getattr(channel.pool, "connection_kwargs", {})
        # Which Redis and database the channel's commands reach: batches of channels that
        # reach the same one may go out in one script.
        self.server = tuple(kwargs.get(k) for k in ("host", "port", "path", "db"))

    def serves(self, channel: Any) -> bool:
        return channel is self._channel

    def publish(self, exchange: str, messages: Sequence[Outgoing]) -> None:
        """Publish ``messages`` to ``exchange`` in order, all or none (one script)."""
        self.push(exchange, [self.build(exchange, outgoing) for outgoing in messages])

    def push(self, exchange: str, built: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Route and push ``(routing_key, message)`` pairs, each message already as kombu's
        ``basic_publish`` makes it (``_inplace_augment_message``), all or none."""
        self.push_together([self.prepare(exchange, built)])

    def prepare(self, exchange: str, built: Sequence[tuple[str, dict[str, Any]]]) -> Batch:
        """``built`` as a batch this channel routes, to push now or with others. To the
        nameless exchange (Celery's task messages), each routing key names its queue."""
        if not exchange:
            encoded = tuple((key, message, dumps(message)) for key, message in built)
            return Batch(self, exchange, None, encoded)
        kind = self._channel.typeof(exchange)
        if kind.type not in ("topic", "direct"):
            raise NotRoutedHere(f"a {kind.type} exchange")
        encoded = tuple((key, message, dumps(message)) for key, message in built)
        return Batch(self, exchange, kind, encoded)

    def push_together(self, batches: Sequence[Batch]) -> None:
        """Push ``batches`` in order, all or none, in one script on this channel. Each is routed
        by the channel that prepared it; every one of them must reach this channel's Redis."""
        if any(batch.routed.server != self.server for batch in batches):
            raise NotRoutedHere("batches for another Redis")
        # Each table not read yet costs one routing more.
        for _ in range(ROUTINGS + sum(1 for batch in batches if batch.exchange) - 1):
            keys, args = _routed_together(batches)
            reply = self._channel.run_script(_CHECK_AND_PUSH, keys, args)
            if not isinstance(reply, list):
                return
            position, table = int(reply[0]), reply[1]
            changed = [batch for batch in batches if batch.exchange][position - 1]
            changed.routed.learn(changed.exchange, table)
        raise NotRoutedHere(f"the bindings changed under {ROUTINGS} routings")

    def build(self, exchange: str, outgoing: Outgoing) -> tuple[str, dict[str, Any]]:
        """``outgoing`` as kombu's ``basic_publish`` would push it."""
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

    def learn(self, exchange: str, bindings: list[bytes]) -> None:
        self._tables[exchange] = _Table(self._channel, bindings)

    def route(self, batch: Batch) -> tuple[str | None, list[Any], list[tuple[str, str]]]:
        """``batch``'s binding table key (None: the nameless exchange, which has none), the
        bindings it is routed by (``[-1]``: none read yet, which the script answers with the
        table), and its pushes: (list key, message JSON)."""
        channel = self._channel
        exchange = batch.exchange
        if not exchange:
            # As kombu's basic_publish and _put: the routing key is the queue.
            return (
                None,
                [],
                [
                    (channel._q_for_pri(key, channel._get_message_priority(message, False)), body)
                    for key, message, body in batch.encoded
                ],
            )
        table_key = channel.keyprefix_queue % exchange
        known = self._tables.get(exchange)
        if known is None:
            return table_key, [-1], []
        deadletter = channel.deadletter_queue
        pushes: list[tuple[str, str]] = []
        for routing_key, message, body in batch.encoded:
            try:
                queues = batch.kind.lookup(known.rows, exchange, routing_key, None)
            except KeyError:  # as kombu's _lookup: an unknown exchange routes nowhere
                queues = []
            # Sorted: a message bound for several queues reaches them in the same order each
            # time (kombu's lookup answers a set).
            for queue in sorted(q for q in queues if q and q != deadletter):
                if queue in channel._expires:
                    raise NotRoutedHere(f"queue {queue} expires")
                key = channel._q_for_pri(queue, channel._get_message_priority(message, False))
                pushes.append((key, body))
        return table_key, [len(known.bindings), *known.bindings], pushes


def _routed_together(batches: Sequence[Batch]) -> tuple[list[str], list[Any]]:
    """The script's keys and arguments for ``batches``, each routed by its own channel."""
    tables: list[str] = []
    checks: list[Any] = []
    lists: list[str] = []
    index: dict[str, int] = {}
    pushes: list[Any] = []
    for batch in batches:
        table_key, bindings, routed = batch.routed.route(batch)
        if table_key is not None:
            tables.append(table_key)
            checks += bindings
        for key, body in routed:
            if key not in index:
                index[key] = len(lists)
                lists.append(key)
            pushes += [index[key], body]
    # Lua counts from 1, and the lists come after the tables in KEYS.
    offset = len(tables) + 1
    args = [len(tables), *checks, *(v + offset if i % 2 == 0 else v for i, v in enumerate(pushes))]
    return tables + lists, args


class _Table:
    """An exchange's binding table as read: the raw members (what the script compares) and
    kombu's rows (routing key, pattern, queue) that its exchange types route by."""

    __slots__ = ("bindings", "rows")

    def __init__(self, channel: Any, bindings: list[bytes]) -> None:
        self.bindings = list(bindings)
        self.rows = [tuple(bytes_to_str(binding).split(channel.sep)) for binding in bindings]
