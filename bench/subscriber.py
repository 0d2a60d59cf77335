"""A downstream subscriber on ``tenant.events``: when did each tenant's ``started`` (or a
rejection) reach a consumer's own queue."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

from kombu import Connection, Consumer, Queue, binding

from service.publisher import EVENTS

STARTED = "tenant.provisioning.started"
REJECTED = "tenant.command.rejected"


class Arrivals:
    def __init__(self, broker_url: str) -> None:
        self._broker_url = broker_url
        self._queue = Queue(
            f"bench.arrivals.{uuid.uuid4().hex[:8]}",
            bindings=[binding(EVENTS, routing_key=STARTED), binding(EVENTS, routing_key=REJECTED)],
            auto_delete=True,
            durable=False,
        )
        self._seen: dict[tuple[str, str], tuple[str, float, dict[str, Any]]] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-arrivals", daemon=True)

    def __enter__(self) -> Arrivals:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"the event subscriber did not start: {self._error!r}")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _on_message(self, message: Any) -> None:
        arrived = time.time()
        try:
            event = json.loads(message.body)
            data = event.get("data") or {}
            key = (str(event.get("subject")), str(data.get("command_id") or data.get("trigger")))
            with self._changed:
                self._seen.setdefault(key, (event["type"], arrived, data))
                self._changed.notify_all()
        finally:
            message.ack()

    def _run(self) -> None:
        try:
            with Connection(self._broker_url) as connection:
                channel = connection.default_channel
                EVENTS.bind(channel).declare()
                queue = self._queue.bind(channel)
                queue.declare()
                with Consumer(channel, queues=[queue], on_message=self._on_message, accept=None):
                    self._ready.set()
                    while not self._stop.is_set():
                        try:
                            connection.drain_events(timeout=0.2)
                        except TimeoutError:
                            continue
        except BaseException as exc:
            self._error = exc
            raise

    def wait_retry_answer(
        self, slug: str, command_id: str, timeout: float
    ) -> tuple[str, float, dict[str, Any]]:
        """The retry's ``started`` (trigger ``retry``) or its rejection: (type, time, data)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for key in ((slug, "retry"), (slug, command_id)):
                    if key in self._seen:
                        return self._seen[key]
                left = deadline - time.monotonic()
                if left <= 0 or self._error is not None:
                    raise TimeoutError(f"no answer to the retry of {slug} in {timeout}s")
                self._changed.wait(min(left, 0.5))
