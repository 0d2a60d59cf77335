"""The running system under test and the loop that keeps N chains in flight."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from bench import floor
from bench.environment import BenchEnvironment
from bench.processes import BenchProcess, ProcessGroup, celery_worker_args
from bench.timing import CHAIN_LENGTH, TimingLog, saga_key
from config.keys import SAGA_QUEUE
from sagas.messages import CommandType
from sagas.states import TenantState
from service.bootstrap import Container
from service.db.models import AuditEvent, OutboxEvent, Tenant
from service.handlers import Request

POLL_S = 0.002
STALL_S = 90.0
BURST_PREFIX = "burst-"


class BenchError(RuntimeError):
    """The system under test did not do what the bench asked (a step failed, a stall)."""


@dataclass(frozen=True, slots=True)
class Started:
    key: str  # the timing key: ``slug#attempt`` for a saga, the run id for a bare chain
    slug: str
    sent_at: float  # unix time just before the saga was created / the chain was sent


@dataclass(frozen=True, slots=True)
class ChainStats:
    steps_ms: list[float]  # start to start of consecutive steps
    hops_ms: list[float]  # end of a step to the start of the next
    total_ms: float  # sent to the end of the last step
    sent_at: float
    ended_at: float


def utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Harness:
    def __init__(self, env: BenchEnvironment, services: Container, concurrency: int) -> None:
        self.env = env
        self.services = services
        self.concurrency = concurrency
        self.group = ProcessGroup(env.workdir, env.env)
        self.timing = TimingLog(env.timing_dir)
        self.saga_worker: BenchProcess | None = None
        self.bare_worker: BenchProcess | None = None
        self.listener: BenchProcess | None = None
        self.consumer: BenchProcess | None = None

    # --- processes ---
    def start_processes(self) -> None:
        run, c = self.env.run_id, self.concurrency
        floor.create_table(self.services.engine)
        self.saga_worker = self.group.start(
            "saga-worker",
            celery_worker_args("bench.worker_app", SAGA_QUEUE, f"bench-saga-{run}@%h", c),
            "ready.",
        )
        self.bare_worker = self.group.start(
            "bare-worker",
            celery_worker_args("bench.bare_app", "bench.bare", f"bench-bare-{run}@%h", c),
            "ready.",
        )
        self.listener = self.group.start(
            "listener", ["-m", "bench.service_noop", "listen"], "listener.started"
        )
        self.consumer = self.group.start("audit", ["-m", "service", "consume"], "audit.started")

    def stop_processes(self) -> None:
        self.group.stop_all()
        self.timing.close()

    def check_alive(self) -> None:
        for process in self.group.processes:
            if not process.alive():
                raise BenchError(f"{process.name} died; its log:\n{process.log_text()[-3000:]}")

    # --- chains ---
    def start_saga(self) -> Started:
        slug = f"bench-{uuid.uuid4().hex[:12]}"
        sent_at = time.time()
        outcome = self.services.handlers.create(
            Request(CommandType.PROVISION, slug, requested_by="bench"), plan="pro"
        )
        if not outcome.accepted:
            raise BenchError(f"create {slug} was rejected: {outcome.message}")
        return Started(saga_key(slug, 1), slug, sent_at)

    def start_bare(self) -> Started:
        from bench.bare_app import send_bare_chain

        run_id = uuid.uuid4().hex
        sent_at = time.time()
        send_bare_chain(run_id)
        return Started(run_id, run_id, sent_at)

    def drive(self, start: Callable[[], Started], total: int, inflight: int) -> list[Started]:
        """Keep ``inflight`` chains running until ``total`` have ended; return them."""
        active: dict[str, Started] = {}
        done: list[Started] = []
        last_progress = time.monotonic()
        while len(done) < total:
            while len(active) < inflight and len(done) + len(active) < total:
                started = start()
                active[started.key] = started
            self.timing.poll()
            finished = [key for key in active if self.timing.done(key)]
            for key in finished:
                done.append(active.pop(key))
            now = time.monotonic()
            if finished:
                last_progress = now
                continue
            if now - last_progress > STALL_S:
                self.check_alive()
                raise BenchError(
                    f"no chain ended in {STALL_S:.0f}s ({len(done)}/{total} done); saga worker "
                    f"log:\n{self.saga_worker.log_text()[-3000:] if self.saga_worker else ''}"
                )
            time.sleep(POLL_S)
        return done

    def stats(self, started: Started) -> ChainStats:
        times = self.timing.times(started.key)
        first = min(times.pre)
        steps = [
            (times.pre[i + 1] - times.pre[i]) * 1000
            for i in range(first, CHAIN_LENGTH - 1)
            if i in times.pre and i + 1 in times.pre
        ]
        hops = [
            (times.pre[i + 1] - times.post[i]) * 1000
            for i in range(first, CHAIN_LENGTH - 1)
            if i in times.post and i + 1 in times.pre
        ]
        ended = times.post[CHAIN_LENGTH - 1]
        return ChainStats(steps, hops, (ended - started.sent_at) * 1000, started.sent_at, ended)

    def start_floor(self) -> Started:
        from bench.bare_app import send_floor_chain

        run_id = uuid.uuid4().hex
        sent_at = time.time()
        send_floor_chain(run_id)
        return Started(run_id, run_id, sent_at)

    # --- the database ---
    def states_of(self, slugs: Iterable[str]) -> dict[str, str]:
        wanted = list(slugs)
        found: dict[str, str] = {}
        with Session(self.services.engine) as session:
            for i in range(0, len(wanted), 500):
                rows = session.exec(
                    select(Tenant.slug, Tenant.state).where(
                        col(Tenant.slug).in_(wanted[i : i + 500])
                    )
                ).all()
                found.update({slug: state for slug, state in rows})
        return found

    def require_state(self, slugs: list[str], state: TenantState) -> None:
        states = self.states_of(slugs)
        wrong = {slug: s for slug, s in states.items() if s != state} | {
            slug: "missing" for slug in slugs if slug not in states
        }
        if wrong:
            sample = dict(list(wrong.items())[:5])
            raise BenchError(f"{len(wrong)} of {len(slugs)} tenants are not {state}: {sample}")

    def wait_state(self, slugs: list[str], state: TenantState, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.states_of(slugs)
            if len(states) == len(slugs) and all(s == state for s in states.values()):
                return
            time.sleep(0.005)
        self.require_state(slugs, state)

    def outbox_last_id(self) -> int:
        with Session(self.services.engine) as session:
            return int(session.exec(select(func.max(OutboxEvent.id))).one() or 0)

    def outbox_count(self) -> int:
        with Session(self.services.engine) as session:
            return int(session.exec(select(func.count()).select_from(OutboxEvent)).one())

    def audit_count(self, *, burst: str | None = None) -> int:
        query = select(func.count()).select_from(AuditEvent)
        if burst is None:
            # The saga's events only: what the outbox holds (the floor's never pass through it).
            query = query.where(~col(AuditEvent.subject).startswith(BURST_PREFIX))
            query = query.where(~col(AuditEvent.subject).startswith(floor.FLOOR_PREFIX))
        else:
            query = query.where(AuditEvent.subject == burst)
        with Session(self.services.engine) as session:
            return int(session.exec(query).one())

    def wait_audit_caught_up(self, timeout: float = 120.0) -> None:
        """Until every event of the outbox is in the audit store."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.audit_count() >= self.outbox_count():
                return
            time.sleep(0.02)
        raise BenchError(
            f"the audit store holds {self.audit_count()} events of {self.outbox_count()} "
            f"after {timeout:.0f}s"
        )

    def audit_lags_ms(self, slugs: list[str]) -> list[float]:
        lags: list[float] = []
        with Session(self.services.engine) as session:
            for i in range(0, len(slugs), 500):
                rows = session.exec(
                    select(AuditEvent.time, AuditEvent.received_at).where(
                        col(AuditEvent.subject).in_(slugs[i : i + 500])
                    )
                ).all()
                lags.extend(
                    (utc(received) - utc(when)).total_seconds() * 1000
                    for when, received in rows
                    if when is not None
                )
        return lags
