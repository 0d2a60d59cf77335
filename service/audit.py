"""The audit consumer: ``provisioner.audit`` -> ``audit_events``, acknowledged after commit.

Messages are stored in batches (up to ``BATCH_SIZE`` messages or ``BATCH_WINDOW_S`` seconds,
whichever comes first) in one transaction, and acknowledged only once it has committed. The
insert ignores an event id already stored, so a redelivered message (a crash between commit and
ack, the relay publishing twice) leaves exactly one row. A message that is not a CloudEvent is
kept in ``dead_letters`` (source ``audit``) in the same transaction, then acknowledged: never
dropped, never fatal. If the database refuses the batch, nothing is acknowledged: the messages
go back to the broker and the consumer backs off.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import structlog
from kombu import Connection, Consumer, Message
from sqlalchemy import Engine, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.sql.dml import Insert
from sqlmodel import Session

from config.keys import CONSUMER_REDELIVER_AFTER_S, consumer_transport_options
from service import metrics
from service.db.engine import unit_of_work
from service.db.models import AuditEvent, DeadLetter
from service.dead_letters import already_kept, dead_letter_of, redelivered
from service.events import read_event
from service.publisher import AUDIT_QUEUE_DECL, EVENTS
from service.reliable_redis import consumer_connection

log = structlog.get_logger(__name__)

DEAD_LETTER_SOURCE = "audit"
BATCH_SIZE = 200
BATCH_WINDOW_S = 0.1
# Above the batch size, so the broker keeps the next batch coming while one is being stored.
PREFETCH = 2 * BATCH_SIZE
IDLE_POLL_S = 0.5
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# Column sizes of ``audit_events``: PostgreSQL refuses a longer value and would fail the batch.
_LIMITS = {"id": 200, "type": 80, "subject": 200, "tenant_id": 36}


def lag_seconds(event_time: datetime | None, now: datetime | None = None) -> float | None:
    """How long ago the event happened (its CloudEvent ``time``): the audit store's lag."""
    if event_time is None:
        return None
    if event_time.tzinfo is None:
        event_time = event_time.replace(tzinfo=UTC)
    return ((now or datetime.now(UTC)) - event_time).total_seconds()


def audit_row(event: dict[str, Any], received_at: datetime) -> dict[str, Any]:
    """The ``audit_events`` row of a parsed CloudEvent; ``ValueError`` if it cannot be one."""
    data = event.get("data")
    data = {} if data is None else data
    fields = dict(event, tenant_id=data.get("tenant_id") if isinstance(data, dict) else None)
    for name, limit in _LIMITS.items():
        value = fields.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            raise ValueError(f"{name} is not a string of at most {limit} characters")
    attempt = data.get("attempt_number") if isinstance(data, dict) else None
    if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int)):
        raise ValueError("data.attempt_number is not an integer")
    when = event.get("time")
    return {
        "event_id": event["id"],
        "type": event["type"],
        "subject": event.get("subject"),
        "tenant_id": fields["tenant_id"],
        "attempt_number": attempt,
        "time": when.astimezone(UTC) if isinstance(when, datetime) else None,
        "data": data,
        "received_at": received_at,
    }


def insert_ignoring_duplicates(engine: Engine) -> Insert:
    """``INSERT … ON CONFLICT (event_id) DO NOTHING`` in the engine's dialect, executed with the
    rows as parameters: one statement compiled once (SQLAlchemy caches it), not a multi-row
    ``VALUES`` compiled anew for every batch size."""
    table: Table = AuditEvent.__table__  # type: ignore[attr-defined]
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=["event_id"])
    return sqlite.insert(table).on_conflict_do_nothing(index_elements=["event_id"])


class Parsed(NamedTuple):
    row: dict[str, Any]
    body: bytes
    content_type: str | None


class StoreFailed(Exception):
    """The database did not take the batch; its messages went back to the broker."""


class AuditConsumer:
    def __init__(
        self,
        broker_url: str,
        engine: Engine,
        *,
        batch_size: int = BATCH_SIZE,
        batch_window_s: float = BATCH_WINDOW_S,
        redeliver_after_s: float = CONSUMER_REDELIVER_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker_url = broker_url
        self._engine = engine
        self._batch_size = batch_size
        self._batch_window_s = batch_window_s
        self._redeliver_after_s = redeliver_after_s
        self._clock = clock
        self._pending: list[Message] = []
        self._amqp = False
        self._first_at = 0.0
        self._backoff_s = 0.0
        self.stored = 0
        self.dead_lettered = 0
        self.last_lag_s: float | None = None

    # --- one message, one batch ---
    def on_message(self, message: Message) -> None:
        if not self._pending:
            self._first_at = self._clock()
        self._pending.append(message)

    def batch_due(self) -> bool:
        return bool(self._pending) and (
            len(self._pending) >= self._batch_size
            or self._clock() - self._first_at >= self._batch_window_s
        )

    def flush(self) -> int:
        """Store the pending messages in one transaction, then acknowledge them; return how
        many. On a database error the messages are requeued and :class:`StoreFailed` raised."""
        batch, self._pending = self._pending, []
        if not batch:
            return 0
        now = datetime.now(UTC)
        rows: dict[str, Parsed] = {}
        dead: list[DeadLetter] = []
        # Dead letters of messages handed back after a crash: kept only if not kept already.
        maybe_kept: list[DeadLetter] = []
        for message in batch:
            body = _body_of(message)
            try:
                row = audit_row(read_event(body), now)
            except Exception as exc:
                kept = dead_letter_of(body, message.content_type, str(exc), DEAD_LETTER_SOURCE)
                (maybe_kept if redelivered(message) else dead).append(kept)
            else:
                rows.setdefault(row["event_id"], Parsed(row, body, message.content_type))
        try:
            dead += self._not_kept_yet(maybe_kept)
            refused = self._store(list(rows.values()), dead)
        except Exception as exc:
            log.warning("audit.store_failed", error=str(exc)[:500], messages=len(batch))
            for message in batch:
                message.requeue()
            raise StoreFailed(str(exc)) from exc
        _ack_all(batch, amqp=self._amqp)
        self.stored += len(rows) - refused
        self.dead_lettered += len(dead) + refused
        times = [p.row["time"] for p in rows.values() if p.row["time"] is not None]
        if times:
            self.last_lag_s = lag_seconds(max(times), now)
            if self.last_lag_s is not None:
                metrics.record_audit_lag(self.last_lag_s)
        log.info(
            "audit.stored",
            messages=len(batch),
            events=len(rows) - refused,
            dead_lettered=len(dead) + refused,
            lag_s=None if self.last_lag_s is None else round(self.last_lag_s, 3),
        )
        return len(batch)

    def _not_kept_yet(self, dead: list[DeadLetter]) -> list[DeadLetter]:
        if not dead:
            return []
        # An audit consumer is alone on its messages until it acknowledges them: no other one
        # keeps the same redelivered bytes between this read and the batch's transaction.
        with Session(self._engine) as session:
            return [letter for letter in dead if not already_kept(session, letter)]

    def _store(self, parsed: list[Parsed], dead: list[DeadLetter]) -> int:
        """Store the batch in one transaction; return how many events the database refused."""
        try:
            with unit_of_work(self._engine) as session:
                if parsed:
                    rows = [p.row for p in parsed]
                    session.execute(insert_ignoring_duplicates(self._engine), rows)
                session.add_all(dead)
            return 0
        except (DataError, IntegrityError):
            if len(parsed) + len(dead) <= 1:
                raise
            # One row the database refuses must not hold back the others (a poison batch would
            # be requeued forever): store them one at a time, dead-lettering the refused ones.
            return self._store_one_by_one(parsed, dead)

    def _store_one_by_one(self, parsed: list[Parsed], dead: list[DeadLetter]) -> int:
        refused: list[DeadLetter] = []
        for p in parsed:
            try:
                with unit_of_work(self._engine) as session:
                    session.execute(insert_ignoring_duplicates(self._engine), [p.row])
            except (DataError, IntegrityError) as exc:
                error = f"refused by the database: {getattr(exc, 'orig', exc)}"
                refused.append(dead_letter_of(p.body, p.content_type, error, DEAD_LETTER_SOURCE))
        with unit_of_work(self._engine) as session:
            session.add_all([*dead, *refused])
        return len(refused)

    # --- the loop ---
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with consumer_connection(
                    self._broker_url,
                    {
                        **consumer_transport_options("audit"),
                        "visibility_timeout": self._redeliver_after_s,
                    },
                ) as connection:
                    self._consume(connection, stop)
            except Exception as exc:
                if stop.is_set():
                    break
                log.warning("audit.connection_lost", error=str(exc))
                stop.wait(1.0)
        log.info("audit.stopped", stored=self.stored, dead_lettered=self.dead_lettered)

    def _consume(self, connection: Connection, stop: threading.Event) -> None:
        channel = connection.default_channel
        EVENTS.bind(channel).declare()
        queue = AUDIT_QUEUE_DECL.bind(channel)
        queue.declare()
        # Messages of a lost connection come back from the broker; never ack them on a new one.
        self._pending = []
        self._amqp = connection.transport.driver_type == "amqp"
        with Consumer(
            channel,
            queues=[queue],
            on_message=self.on_message,
            prefetch_count=PREFETCH,
            accept=None,
        ):
            log.info("audit.started", queue=queue.name, batch_size=self._batch_size)
            while not stop.is_set():
                self._gather(channel, stop)
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=self._drain_timeout())
                if self.batch_due():
                    self._flush_or_back_off(stop)
            self._flush_or_back_off(stop)

    def _gather(self, channel: Any, stop: threading.Event) -> None:
        """With a batch open and the queue just emptied, let the rest of the window's events
        gather on the queue, then take them in one round trip: taken one by one as they came,
        a trickle cost four times the CPU an event that a burst did (docs/benchmarks.md,
        round 6). The batch is stored at the window's end either way. On RabbitMQ the broker
        streams deliveries up to the prefetch: nothing to gather."""
        if not self._pending or self.batch_due():
            return
        remaining = self._first_at + self._batch_window_s - self._clock()
        take_next = getattr(channel, "take_next", None)
        if remaining > 0 and take_next is not None and take_next():
            stop.wait(remaining)

    def _drain_timeout(self) -> float:
        if not self._pending:
            return IDLE_POLL_S
        return max(0.01, self._first_at + self._batch_window_s - self._clock())

    def _flush_or_back_off(self, stop: threading.Event) -> None:
        try:
            self.flush()
        except StoreFailed:
            self._backoff_s = min(max(2 * self._backoff_s, BACKOFF_FIRST_S), BACKOFF_MAX_S)
            stop.wait(self._backoff_s)
        else:
            self._backoff_s = 0.0


def _ack_all(batch: list[Message], *, amqp: bool) -> None:
    """Acknowledge a stored batch in one round trip where the transport allows it."""
    ack_many = getattr(batch[-1].channel.qos, "ack_many", None) if not amqp else None
    if ack_many is not None:  # service/reliable_redis.py
        ack_many([message.delivery_tag for message in batch])
    elif amqp:
        # The batch is every delivery not yet acknowledged on this channel, in delivery order:
        # one basic.ack with `multiple` covers it.
        batch[-1].ack(multiple=True)
    else:
        for message in batch:
            message.ack()


def _body_of(message: Message) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode("utf-8")
