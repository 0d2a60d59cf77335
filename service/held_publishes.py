"""Events held on a thread until its next task message, so that both go out in one round trip.

A saga step ends with two publishes: its events, right after the commit that wrote them, then
Celery's message for the next step. Sent apart, they are two round trips to Redis on the step's
critical path. While a task holds (``start`` ... ``stop``, around a task on the Redis transport):

- the events its completion asks to send with the next message are built and kept here
  (``service.publisher``), not sent;
- the next message the thread publishes through ``service.reliable_redis`` carries them in its
  own script, first: the events are on ``tenant.events`` before the next step can be taken, as
  when they were sent apart, and neither goes without the other;
- whatever is still held when the task ends (the last step, a step that failed for good) is sent
  then (``stop``, then ``send``: tasks/steps.py).

Only the order of sending moves, never what is sent: the rows were committed to the outbox
first, and are marked published only once sent (``on_sent``); if the process dies while they
are held, the relay publishes them, as after any publish that did not happen.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from service.routed_publish import Batch

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Held:
    batch: Batch
    on_sent: Callable[[], None] | None = None

    def sent(self) -> None:
        if self.on_sent is not None:
            self.on_sent()


class HeldPublishes:
    """Per thread: a pool process runs one task at a time on its main thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def start(self) -> None:
        """Hold from now on this thread (a task begins)."""
        self._local.held = []

    def holding(self) -> bool:
        return getattr(self._local, "held", None) is not None

    def hold(self, held: Held) -> None:
        self._local.held.append(held)

    def take(self) -> list[Held]:
        """What is held, to be sent by the caller; holding goes on."""
        held: list[Held] | None = getattr(self._local, "held", None)
        if not held:
            return []
        self._local.held = []
        return held

    def put_back(self, held: list[Held]) -> None:
        """A publish that was to carry ``held`` failed: hold them again, before anything since."""
        if held and self.holding():
            self._local.held[:0] = held

    def stop(self) -> list[Held]:
        """Stop holding (the task ended); what is still held, to be sent by the caller."""
        held: list[Held] = getattr(self._local, "held", None) or []
        self._local.held = None
        return held


HELD = HeldPublishes()


def send(held: list[Held]) -> None:
    """Send ``held`` batches in order, one script per channel that built them (all of one step's
    come from one channel: one script)."""
    group: list[Held] = []
    for item in held:
        if group and item.batch.routed is not group[0].batch.routed:
            _send_group(group)
            group = []
        group.append(item)
    if group:
        _send_group(group)


def _send_group(group: list[Held]) -> None:
    group[0].batch.routed.push_together([item.batch for item in group])
    for item in group:
        item.sent()
