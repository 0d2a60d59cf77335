"""A real subscriber on ``tenant.events``: what downstream consumers would see."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kombu import Connection, Consumer, Queue

from service.events import read_event
from service.publisher import EVENTS

Event = dict[str, Any]


class EventTap:
    """Binds its own queue with ``#`` and keeps every event, parsed and checked as a
    CloudEvent, in arrival order."""

    def __init__(self, broker_url: str, validators: list[Callable[[Event], None]] | None = None):
        self._broker_url = broker_url
        self._validators = validators or []
        self.events: list[Event] = []
        self.invalid: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._queue = Queue(
            f"tests.tap.{uuid.uuid4().hex[:8]}",
            exchange=EVENTS,
            routing_key="#",
            auto_delete=True,
            durable=False,
        )
        self._thread = threading.Thread(target=self._run, name="event-tap", daemon=True)

    def start(self) -> EventTap:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("event tap did not start")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _on_message(self, message: Any) -> None:
        body = message.body
        try:
            event = read_event(body)
            assert message.content_type == "application/cloudevents+json", message.content_type
            assert message.delivery_info.get("routing_key") in (None, event["type"])
            for validate in self._validators:
                validate(event)
        except Exception as exc:
            with self._lock:
                self.invalid.append((str(body)[:500], repr(exc)))
        else:
            with self._lock:
                self.events.append(event)
        message.ack()

    def _run(self) -> None:
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

    # --- queries ---
    def of(self, slug: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.get("subject") == slug]

    def types(self, slug: str) -> list[str]:
        return [e["type"] for e in self.of(slug)]

    def wait_for(
        self, predicate: Callable[[list[Event]], bool], slug: str, timeout: float = 30.0
    ) -> list[Event]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.of(slug)
            if predicate(events):
                return events
            time.sleep(0.05)
        raise AssertionError(
            f"timed out after {timeout}s waiting on events of {slug}; saw {self.types(slug)}"
        )

    def wait_for_type(
        self, slug: str, event_type: str, count: int = 1, timeout: float = 30.0
    ) -> list[Event]:
        return self.wait_for(
            lambda events: sum(e["type"] == event_type for e in events) >= count, slug, timeout
        )


def settled(events: list[Event]) -> bool:
    return any(
        e["type"] in ("tenant.provisioning.completed", "tenant.provisioning.failed") for e in events
    )


def data_of(events: list[Event], event_type: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["type"] == event_type]


def new_slug(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
