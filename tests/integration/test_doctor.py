"""``provisioner doctor``: healthy says so (exit 0); each problem is reported with its fix.

Each test gets a deployment of its own, so that what other tests leave behind (locks of hung
sagas, events waiting in the audit queue) cannot make it look sick: a private redis-server for the
locks, a fresh broker (a database of that Redis, or a fresh RabbitMQ vhost when the session runs
on RabbitMQ) and a fresh database (SQLite file, or PostgreSQL schema).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kombu import Connection
from redis import Redis
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from config.keys import AUDIT_QUEUE, COMMANDS_QUEUE, SAGA_QUEUE, processing_key, worker_key
from config.settings import Settings, load_settings
from sagas.messages import CommandType, EventType
from sagas.states import AttemptState, TenantState
from service.bootstrap import build_container
from service.db.engine import make_engine, unit_of_work
from service.db.migrate import migrate
from service.db.models import Attempt, OutboxEvent, Tenant
from service.dispatch import AttemptRef, DecommissionRef, StepTenant
from service.doctor import Doctor, Finding, healthy
from service.handlers import Request
from service.locks import LockToken
from service.outbox import PendingEvents
from service.publisher import Publisher
from service.worker_leases import WorkerLeases, new_incarnation
from tests.support.commands import command_body
from tests.support.environment import postgres_schema_url, rabbitmq_vhost_url
from tests.support.leases import deliver_and_die
from tests.support.private_redis import PrivateRedis

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class NoDispatch:
    """The doctor's deployment runs no worker: nothing here may start a saga."""

    def start_attempt(self, ref: AttemptRef, steps: list[str], tenant: StepTenant) -> None:
        raise AssertionError("no saga should start in the doctor tests")

    def start_decommission(self, ref: DecommissionRef, compensations: list[str]) -> None:
        raise AssertionError("no decommission should start in the doctor tests")


@dataclass
class Deployment:
    settings: Settings
    engine: Engine
    redis: Redis

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PROVISIONER_REDIS_URL": self.settings.redis_url,
            "PROVISIONER_BROKER_URL": self.settings.broker_url,
            "PROVISIONER_DATABASE_URL": self.settings.database_url,
            "PROVISIONER_DATA_DIR": str(self.settings.data_dir),
        }

    def doctor(self) -> list[Finding]:
        return Doctor(self.settings).examine()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", "doctor", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )


def fresh_database(tmp_path: Path) -> str:
    base = os.environ.get("TEST_DATABASE_URL")
    if base:
        return postgres_schema_url(base)[0]
    return f"sqlite:///{tmp_path}/doctor.db"


def fresh_broker(private: PrivateRedis) -> str:
    base = os.environ.get("TEST_BROKER_URL", "")
    return rabbitmq_vhost_url(base) if base.startswith("amqp") else private.url(1)


@pytest.fixture
def deployment(workdir: Path, tmp_path: Path) -> Iterator[Deployment]:
    private = PrivateRedis(workdir, "doctor-redis").start()
    settings = load_settings(
        redis_url=private.url(0),
        broker_url=fresh_broker(private),
        database_url=fresh_database(tmp_path),
        data_dir=tmp_path / "data",
    )
    engine = make_engine(settings.database_url)
    migrate(engine)
    try:
        yield Deployment(settings, engine, Redis.from_url(settings.redis_url))
    finally:
        engine.dispose()
        private.stop()


def problems(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings if not f.ok}


def add_tenant(engine: Engine, slug: str, state: TenantState, *, idle_for_s: float = 0) -> str:
    long_ago = datetime.now(UTC) - timedelta(seconds=idle_for_s)
    tenant = Tenant(
        id=str(uuid.uuid4()),
        slug=slug,
        live_slug=slug,
        plan="pro",
        state=state,
        epoch=1,
        created_at=long_ago,
        updated_at=long_ago,
    )
    with unit_of_work(engine) as session:
        session.add(tenant)
        session.flush()
        session.add(
            Attempt(
                id=str(uuid.uuid4()),
                tenant_id=tenant.id,
                number=1,
                epoch=1,
                trigger="create",
                state=AttemptState.RUNNING
                if state == TenantState.PROVISIONING
                else AttemptState.FAILED,
                resumed_from="validate",
                started_at=long_ago,
            )
        )
    return tenant.id


def add_old_event(engine: Engine, slug: str, age_s: float) -> None:
    with unit_of_work(engine) as session:
        row = PendingEvents().add(
            session,
            EventType.COMMAND_REJECTED,
            slug,
            {
                "tenant_id": None,
                "slug": slug,
                "state": None,
                "command_type": CommandType.RETRY.value,
                "command_id": str(uuid.uuid4()),
                "reason": "unknown_tenant",
                "message": f"no tenant {slug!r}",
            },
        )
        row.created_at = datetime.now(UTC) - timedelta(seconds=age_s)
        session.add(row)


def unpublished(engine: Engine) -> int:
    with Session(engine) as session:
        rows = session.exec(select(OutboxEvent).where(col(OutboxEvent.published_at).is_(None)))
        return len(rows.all())


def purge_audit_queue(broker_url: str) -> None:
    """Nobody consumes the audit queue here: empty it, as an audit consumer would."""
    with Connection(broker_url) as connection:
        connection.default_channel.queue_purge(AUDIT_QUEUE)


def test_a_healthy_deployment_exits_0(deployment: Deployment) -> None:
    answer = deployment.cli("--json")
    assert answer.returncode == 0, answer.stdout + answer.stderr
    report = json.loads(answer.stdout)
    assert report["healthy"] is True
    checks = {c["check"]: c for c in report["checks"]}
    assert {"broker", "redis", "database", "migrations", "outbox", "locks"} <= set(checks)
    assert {"queue provisioner.saga", "queue provisioner.commands", "queue provisioner.audit"} <= (
        set(checks)
    )
    assert all(c["fix"] is None for c in report["checks"])
    text = deployment.cli()
    assert text.returncode == 0, text.stdout + text.stderr
    assert "PROBLEM" not in text.stdout
    assert text.stdout.strip().endswith("healthy")


def test_problems_are_reported_with_their_fix_and_the_fix_works(
    deployment: Deployment,
) -> None:
    engine, redis = deployment.engine, deployment.redis
    stale = f"stale-{uuid.uuid4().hex[:8]}"
    add_tenant(engine, stale, TenantState.FAILED)
    redis.set(f"lock:{stale}", LockToken.new(str(uuid.uuid4()), 1).encode())
    orphan = f"orphan-{uuid.uuid4().hex[:8]}"
    redis.set(f"lock:{orphan}", LockToken.new(str(uuid.uuid4()), 1).encode())
    stalled = f"stalled-{uuid.uuid4().hex[:8]}"
    add_tenant(engine, stalled, TenantState.PROVISIONING, idle_for_s=600)
    add_old_event(engine, "backlog-x", age_s=300)

    answer = deployment.cli()
    assert answer.returncode == 1, answer.stdout + answer.stderr
    text = answer.stdout
    assert f"stale lock on {stale} (tenant failed)" in text
    assert f"run `provisioner reset {stale}`" in text
    assert f"stale lock on {orphan} (no live tenant" in text
    assert f"DEL lock:{orphan}" in text
    assert "1 event(s) unpublished" in text
    assert "start `provisioner relay`" in text
    assert f"{stalled} is provisioning with no lock holder" in text
    assert f"`provisioner reset {stalled}`, then `provisioner retry {stalled}`" in text

    report = json.loads(deployment.cli("--json").stdout)
    assert report["healthy"] is False
    found = {c["check"]: c for c in report["checks"] if not c["ok"]}
    assert set(found) == {"outbox", "locks", f"lock {stale}", f"lock {orphan}", f"run {stalled}"}
    assert found["outbox"]["details"]["unpublished"] == 1
    assert found["outbox"]["details"]["oldest_age_s"] >= 299
    assert found[f"lock {stale}"]["details"]["tenant_state"] == "failed"

    # Do what the doctor says, and it is satisfied.
    services = build_container(deployment.settings, dispatcher=NoDispatch(), run_migrations=False)
    reset = services.handlers.reset(Request(CommandType.RESET, stale))
    assert reset.accepted
    assert reset.details["lock_released"] is True
    assert services.handlers.reset(Request(CommandType.RESET, stalled)).accepted
    redis.delete(f"lock:{orphan}")
    assert services.relay.drain() >= 1
    # The resets' own events were published at once and are marked a moment later, in a batch
    # (service/marks.py); a process marks what is left when it exits, as this flush does.
    services.relay.flush_marks()
    assert unpublished(engine) == 0
    services.publisher.close()
    purge_audit_queue(deployment.settings.broker_url)
    after = deployment.doctor()
    assert healthy(after), [f for f in after if not f.ok]


def test_a_lock_of_a_running_saga_is_not_stale(deployment: Deployment) -> None:
    busy = f"busy-{uuid.uuid4().hex[:8]}"
    add_tenant(deployment.engine, busy, TenantState.PROVISIONING, idle_for_s=600)
    deployment.redis.set(f"lock:{busy}", LockToken.new(str(uuid.uuid4()), 1).encode(), px=60_000)
    findings = deployment.doctor()
    assert healthy(findings), [f for f in findings if not f.ok]


def test_commands_nobody_consumes(deployment: Deployment) -> None:
    publisher = Publisher(deployment.settings.broker_url)
    _, body = command_body("tenant.reset_requested", "nobody-home")
    publisher.publish_command("tenant.reset_requested", body)
    publisher.close()
    findings = {f.check: f for f in deployment.doctor()}
    queue = findings["queue provisioner.commands"]
    assert queue.details["messages"] == 1
    if deployment.settings.broker_url.startswith("amqp"):
        # RabbitMQ knows there is no consumer: that is a problem, and the fix names it.
        assert not queue.ok
        assert queue.fix == "nothing consumes it: start `provisioner listen`"
    else:
        # The Redis transport cannot tell whether anybody consumes: one message is no alarm.
        assert queue.ok, queue
        assert queue.details["consumers"] is None


def test_an_empty_database_and_a_dead_broker(tmp_path: Path, deployment: Deployment) -> None:
    closed = PrivateRedis(tmp_path, "closed")  # a port nothing listens on
    settings = load_settings(
        redis_url=deployment.settings.redis_url,
        broker_url=f"redis://127.0.0.1:{closed.port}/0",
        database_url=f"sqlite:///{tmp_path}/empty.db",
        data_dir=tmp_path / "data",
    )
    found = problems(Doctor(settings).examine())
    assert found["broker"].summary.startswith("cannot connect")
    assert "PROVISIONER_BROKER_URL" in (found["broker"].fix or "")
    assert found["migrations"].summary.startswith("database at no schema")
    assert "provisioner list" in (found["migrations"].fix or "")
    assert "redis" not in found
    assert found["outbox"].summary.startswith("not checked")


def test_steps_held_by_a_dead_worker_on_redis(workdir: Path, deployment: Deployment) -> None:
    """Redis broker: a dead worker's steps are a problem until a live worker hands them out."""
    private = PrivateRedis(workdir, "doctor-leases").start()
    try:
        settings = deployment.settings.model_copy(update={"broker_url": private.url(3)})
        broker = settings.broker_url
        dead = new_incarnation("doctor-dead@host")
        leases = WorkerLeases(broker)
        leases.register(dead)
        deliver_and_die(broker, dead, SAGA_QUEUE, "a step")
        assert {f.check: f for f in Doctor(settings).examine()}["workers"].ok  # lease still on

        Redis.from_url(broker).delete(worker_key(dead, "lease"))  # lapsed: the process is gone
        found = problems(Doctor(settings).examine())
        assert "1 step(s) held by dead worker(s)" in found["workers"].summary
        assert found["workers"].fix == (
            "start `provisioner worker`: it hands the dead workers' steps out again"
        )
        assert found["workers"].details["dead_holding_steps"] == {dead: 1}

        # What a live worker's lease thread does: the step is back in the queue.
        live = new_incarnation("doctor-live@host")
        leases.register(live)
        assert leases.sweep(own=live) == {dead: 1}
        findings = {f.check: f for f in Doctor(settings).examine()}
        assert findings["workers"].ok, findings["workers"]
        assert findings["queue provisioner.saga"].details["messages"] == 1
        assert findings["unreadable messages"].ok
        leases.close()

        # Raw bytes pushed onto a queue are set aside by the consumer; the doctor names them.
        unreadable = f"{processing_key(COMMANDS_QUEUE)}:unreadable"
        Redis.from_url(broker).rpush(unreadable, b"\xffjunk")
        found = problems(Doctor(settings).examine())
        assert found["unreadable messages"].details["keys"] == {unreadable: 1}
        assert "redis-cli LRANGE" in (found["unreadable messages"].fix or "")
    finally:
        private.stop()
