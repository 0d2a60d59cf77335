"""Issue 5: the audit store, the timeline and diff read models, and a downstream consumer.

A real worker, a real audit consumer (``provisioner consume``, a subprocess) and the event tap
(what any subscriber of ``tenant.events`` sees): the audit store must hold exactly what was on
the bus, once, even when the consumer is killed mid-stream.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Producer, Queue
from redis import Redis
from sqlalchemy import Engine, text
from sqlmodel import Session, col
from sqlmodel import select as sql_select
from typer.testing import CliRunner

from config.keys import consumer_transport_options
from sagas.messages import CommandType, EventType
from sagas.steps import STEPS
from service import feed
from service.bootstrap import Container
from service.cli import app
from service.db.engine import is_sqlite, unit_of_work
from service.db.models import AuditEvent, DeadLetter
from service.events import build_event
from service.faults import FaultMode
from service.handlers import Request
from service.publisher import EVENTS
from tests.support.events import EventTap, new_slug
from tests.support.processes import ServiceProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPLETED = "tenant.provisioning.completed"
FAILED = "tenant.provisioning.failed"
RESET = "tenant.provisioning.reset"
DECOMMISSIONED = "tenant.decommission.completed"
# The consumer's redelivery delay (10 s) plus start-up and a sweep: what a restart may need.
AUDIT_CATCH_UP_S = 45.0


class AuditConsumers:
    """The audit consumer subprocess; a restart gets a fresh log, so its marker is its own."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._generation = 0
        self.current: ServiceProcess | None = None

    def start(self) -> ServiceProcess:
        self._generation += 1
        process = ServiceProcess(f"audit-{self._generation}", ["consume"], self._workdir)
        self.current = process.start()
        process.wait_ready("audit.started", timeout=30)
        return process

    def kill(self) -> None:
        assert self.current is not None
        assert self.current.process is not None
        os.killpg(self.current.pid, signal.SIGKILL)
        self.current.process.wait(10)

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()


@pytest.fixture(scope="module")
def audit(services: Container, workdir: Path) -> Iterator[AuditConsumers]:
    consumers = AuditConsumers(workdir)
    consumers.start()
    yield consumers
    consumers.stop()


def stored(services: Container, slug: str) -> list[AuditEvent]:
    with Session(services.engine) as session:
        return list(
            session.exec(
                sql_select(AuditEvent)
                .where(AuditEvent.subject == slug)
                .order_by(col(AuditEvent.seq))
            ).all()
        )


def build_event_body(event_type: str, subject: str, data: dict[str, Any]) -> str:
    return build_event(EventType(event_type), subject, data)[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_stored(services: Container, tap: EventTap, slug: str, timeout: float = 20.0) -> None:
    wait_until(
        lambda: {e["id"] for e in tap.of(slug)} <= {r.event_id for r in stored(services, slug)},
        timeout,
        f"the audit store to hold every event of {slug}",
    )


def assert_store_matches_bus(services: Container, tap: EventTap, slug: str) -> None:
    rows = stored(services, slug)
    ids = [r.event_id for r in rows]
    assert len(ids) == len(set(ids)), "duplicate events in the audit store"
    assert set(ids) == {e["id"] for e in tap.of(slug)}
    by_id = {e["id"]: e for e in tap.of(slug)}
    for row in rows:
        event = by_id[row.event_id]
        assert row.type == event["type"]
        assert row.tenant_id == event["data"].get("tenant_id")
        assert row.attempt_number == event["data"].get("attempt_number")
        assert row.data == event["data"]
        assert row.time == event["time"]


def test_a_tenant_story_is_audited_once_and_explained(
    services: Container, worker: ServiceProcess, tap: EventTap, audit: AuditConsumers
) -> None:
    slug = new_slug("story")
    plan = services.faults.add("issue_certificate", mode=FaultMode.ERROR, tenant=slug)
    try:
        assert services.handlers.create(Request(CommandType.PROVISION, slug), plan="pro").accepted
        tap.wait_for_type(slug, FAILED)
    finally:
        services.faults.clear(plan.id)
    follow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "timeline",
            slug,
            "--follow",
            "--attempt",
            "2",
            "--json",
            "--timeout",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert services.handlers.retry(Request(CommandType.RETRY, slug)).accepted
        tap.wait_for_type(slug, COMPLETED)
        followed, follow_err = follow.communicate(timeout=60)
    finally:
        follow.kill()
    assert services.handlers.decommission(Request(CommandType.DECOMMISSION, slug)).accepted
    tap.wait_for_type(slug, DECOMMISSIONED)

    wait_stored(services, tap, slug)
    assert_store_matches_bus(services, tap, slug)
    events = feed.all_events(services.engine, slug)
    assert [e["id"] for e in events] == [e["id"] for e in tap.of(slug)]
    # Stored and acknowledged: a batch whose acknowledgement failed would drop the connection
    # and come back from the broker, stored again for nothing.
    assert audit.current is not None
    assert "audit.connection_lost" not in audit.current.log_text()

    # --follow printed attempt 2 as it was stored, and exited 0 when it completed
    assert follow.returncode == 0, follow_err
    lines = [json.loads(line) for line in followed.splitlines()]
    attempt_2 = [e for e in tap.of(slug) if e["data"].get("attempt_number") == 2]
    assert [e["id"] for e in lines] == [e["id"] for e in attempt_2]
    assert lines[-1]["type"] == COMPLETED

    first, second, decommission = feed.timeline(services.engine, slug)
    assert (first["attempt_number"], first["outcome"]) == (1, "failed")
    assert (first["failed_step"], first["error_type"]) == (
        "issue_certificate",
        "TransientUpstreamError",
    )
    steps = {s["step"]: s for s in first["steps"]}
    assert [steps[s]["status"] for s in STEPS[:4]] == ["completed"] * 4
    assert steps["issue_certificate"]["status"] == "failed"
    assert steps["issue_certificate"]["retries"] == 2
    assert "configure_admin_console" not in steps
    assert (second["attempt_number"], second["outcome"], second["trigger"]) == (
        2,
        "completed",
        "retry",
    )
    assert second["resumed_from"] == "issue_certificate"
    assert [(s["step"], s["status"], s["reused_from_attempt"]) for s in second["steps"]] == [
        (s, "skipped", 1) for s in STEPS[:4]
    ] + [(s, "completed", None) for s in STEPS[4:]]
    assert isinstance(second["duration_ms"], int)
    assert (decommission["kind"], decommission["outcome"]) == ("decommission", "completed")
    assert feed.timeline(services.engine, slug, attempt=2) == [second]

    result = feed.diff(services.engine, slug)
    assert (result["a"]["attempt_number"], result["b"]["attempt_number"]) == (1, 2)
    assert result["reused_steps"] == {step: 1 for step in STEPS[:4]}
    assert result["first_divergence"] == "issue_certificate"
    assert result["failure_repeated"] is False
    assert "did not repeat" in result["summary"]
    assert "reusing validate, reserve_slot" in result["summary"]

    runner = CliRunner()
    shown = runner.invoke(app, ["timeline", slug, "--json"])
    assert shown.exit_code == 0, shown.output
    cli_events = json.loads(shown.stdout)["events"]
    assert [(e["id"], e["type"]) for e in cli_events] == [(e["id"], e["type"]) for e in events]
    table = runner.invoke(app, ["timeline", slug])
    assert table.exit_code == 0, table.output
    assert "attempt 1" in table.stdout
    assert "attempt 2" in table.stdout
    compared = runner.invoke(app, ["diff", slug, "1", "2", "--json"])
    assert compared.exit_code == 0, compared.output
    assert json.loads(compared.stdout)["first_divergence"] == "issue_certificate"
    human = runner.invoke(app, ["diff", slug])
    assert human.exit_code == 0, human.output
    assert "did not repeat" in human.stdout
    assert runner.invoke(app, ["diff", slug, "1", "7"]).exit_code == 1

    # The slug, reused by a new tenant: the old tenant's story stays, the new one comes last.
    again = services.handlers.create(Request(CommandType.PROVISION, slug), plan="free")
    assert again.accepted
    tap.wait_for_type(slug, COMPLETED, count=2)
    wait_stored(services, tap, slug)
    runs = feed.timeline(services.engine, slug)
    assert [(r["tenant_id"], r["kind"], r["attempt_number"]) for r in runs] == [
        (first["tenant_id"], "attempt", 1),
        (first["tenant_id"], "attempt", 2),
        (first["tenant_id"], "decommission", None),
        (again.tenant_id, "attempt", 1),
    ]
    [newest] = feed.timeline(services.engine, slug, attempt=1)
    assert (newest["tenant_id"], newest["outcome"]) == (again.tenant_id, "completed")
    with pytest.raises(feed.FeedError):
        feed.diff(services.engine, slug)  # the new tenant has one attempt


def test_a_malformed_event_is_dead_lettered_not_dropped(
    services: Container, tap: EventTap, audit: AuditConsumers
) -> None:
    marker = uuid.uuid4().hex
    bodies = [
        (f"{{not json {marker}".encode(), "application/cloudevents+json"),
        (json.dumps({"specversion": "1.0", "id": marker}).encode(), "application/json"),
    ]
    with Connection(services.settings.broker_url) as connection:
        producer = Producer(connection.default_channel)
        EVENTS.bind(producer.channel).declare()
        for body, content_type in bodies:
            producer.publish(
                body,
                exchange=EVENTS,
                routing_key="tenant.provisioning.started",
                content_type=content_type,
                content_encoding="utf-8",
            )

    def dead_letters() -> list[DeadLetter]:
        with Session(services.engine) as session:
            rows = session.exec(sql_select(DeadLetter).where(DeadLetter.source == "audit")).all()
        return [row for row in rows if marker in row.body]

    wait_until(lambda: len(dead_letters()) == 2, 20, "two dead letters from the audit consumer")
    assert sorted(row.content_type or "" for row in dead_letters()) == [
        "application/cloudevents+json",
        "application/json",
    ]
    assert all(row.error for row in dead_letters())
    assert audit.current is not None
    assert audit.current.process is not None
    assert audit.current.process.poll() is None, "the audit consumer died"
    # The tap saw them too; they were meant to be malformed.
    wait_until(lambda: sum(marker in body for body, _ in tap.invalid) == 2, 10, "the tap")
    tap.invalid[:] = [item for item in tap.invalid if marker not in item[0]]


def test_a_malformed_event_redelivered_after_a_crash_is_kept_once(
    services: Container, tap: EventTap, audit: AuditConsumers
) -> None:
    marker = uuid.uuid4().hex
    raw = f"{{not a cloudevent {marker}".encode()

    def publish(body: bytes, routing_key: str, **headers: object) -> None:
        with Connection(services.settings.broker_url) as connection:
            producer = Producer(connection.default_channel)
            EVENTS.bind(producer.channel).declare()
            producer.publish(
                body,
                exchange=EVENTS,
                routing_key=routing_key,
                content_type="application/cloudevents+json",
                content_encoding="utf-8",
                headers=headers,
            )

    def kept() -> int:
        with Session(services.engine) as session:
            rows = session.exec(sql_select(DeadLetter).where(DeadLetter.source == "audit")).all()
        return sum(marker in row.body for row in rows)

    def checkpoint() -> None:
        # A valid event sent after: once it is stored, the consumer has read what came before.
        slug = new_slug("after-dead")
        data = {
            "tenant_id": str(uuid.uuid4()),
            "slug": slug,
            "state": "failed",
            "attempt_number": 1,
            "reset_attempt": 1,
            "lock_released": True,
            "requested_by": "test",
        }
        services.publisher.publish_events([(RESET, build_event_body(RESET, slug, data))])
        wait_until(lambda: len(stored(services, slug)) == 1, 20, "the checkpoint event")

    publish(raw, "tenant.provisioning.started")
    wait_until(lambda: kept() == 1, 20, "the dead letter")
    # What the broker hands back when the consumer died after its commit, before its ack: the
    # same bytes, marked redelivered (RabbitMQ's flag; kombu's Redis restore sets the header).
    publish(raw, "tenant.provisioning.started", redelivered=True)
    checkpoint()
    assert kept() == 1
    # The same bytes sent again, not redelivered, are another message: kept again.
    publish(raw, "tenant.provisioning.started")
    wait_until(lambda: kept() == 2, 20, "the second message's dead letter")
    tap.invalid[:] = [item for item in tap.invalid if marker not in item[0]]


@contextmanager
def audit_writes_blocked(engine: Engine) -> Iterator[None]:
    """Hold the lock a write to ``audit_events`` needs (SQLite: the database's write lock)."""
    with unit_of_work(engine) as session:
        if is_sqlite(engine):
            session.execute(text("SELECT 1"))  # the unit of work begins IMMEDIATE
        else:
            session.execute(text("LOCK TABLE audit_events IN SHARE ROW EXCLUSIVE MODE"))
        yield


def in_flight(services: Container) -> int:
    """Messages delivered to an audit consumer and not acknowledged (Redis broker only)."""
    broker = services.settings.broker_url
    if not broker.startswith("redis"):
        return 1
    return int(Redis.from_url(broker).hlen(str(consumer_transport_options("audit")["unacked_key"])))


def test_a_killed_audit_consumer_loses_nothing_and_duplicates_nothing(
    services: Container, worker: ServiceProcess, tap: EventTap, audit: AuditConsumers
) -> None:
    slug = new_slug("killed")
    hang = services.faults.add("check_readiness", mode=FaultMode.HANG, tenant=slug)
    try:
        assert services.handlers.create(Request(CommandType.PROVISION, slug), plan="pro").accepted
        # the saga stops at check_readiness, and the audit store catches up to it
        tap.wait_for(lambda evs: any(e["data"].get("step") == "check_readiness" for e in evs), slug)
        wait_stored(services, tap, slug)
        # kill -9 mid-story: the rest of it queues up for the consumer
        audit.kill()
    finally:
        services.faults.clear(hang.id)
    tap.wait_for_type(slug, COMPLETED)
    assert len(stored(services, slug)) < len(tap.of(slug))

    # A consumer that takes the rest but cannot commit, killed -9 with them unacknowledged.
    with audit_writes_blocked(services.engine):
        audit.start()
        wait_until(lambda: in_flight(services) > 0, 10, "the consumer to take the rest")
        time.sleep(0.3)  # the rest of its batch window
        audit.kill()
    assert len(stored(services, slug)) < len(tap.of(slug))

    audit.start()
    wait_stored(services, tap, slug, timeout=AUDIT_CATCH_UP_S)
    assert_store_matches_bus(services, tap, slug)
    assert in_flight(services) == 0 or not services.settings.broker_url.startswith("redis")


def test_the_downstream_example_prints_every_provisioning_event_in_order(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("downstream")
    queue_name = f"tests.downstream.{uuid.uuid4().hex[:8]}"
    expected_count = 1 + 2 * len(STEPS) + 1  # started, each step started+completed, completed
    consumer = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "downstream_consumer.py"),
            queue_name,
            "--count",
            str(expected_count),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PROVISIONER_BROKER_URL": services.settings.broker_url},
    )
    try:
        assert consumer.stdout is not None
        ready, _, _ = select.select([consumer.stdout], [], [], 20)
        assert ready, "the downstream consumer did not start"
        assert consumer.stdout.readline().startswith(f"listening on {queue_name}")
        assert services.handlers.create(Request(CommandType.PROVISION, slug), plan="free").accepted
        events = tap.wait_for_type(slug, COMPLETED)
        printed, errors = consumer.communicate(timeout=30)
    finally:
        consumer.kill()
        with Connection(services.settings.broker_url) as connection:
            Queue(queue_name, exchange=EVENTS).bind(connection.default_channel).delete()

    assert consumer.returncode == 0, errors
    provisioning = [e for e in events if e["type"].startswith("tenant.provisioning.")]
    assert len(provisioning) == expected_count
    assert printed.splitlines() == [
        f"{e['type']} {slug} attempt=1 step={e['data'].get('step') or '-'}" for e in provisioning
    ]
