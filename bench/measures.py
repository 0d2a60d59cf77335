"""The measures, each run once per repeat; each returns plain numbers for the report."""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from bench.harness import BURST_PREFIX, BenchError, Harness, Started
from bench.stats import percentile
from bench.subscriber import REJECTED, Arrivals
from bench.timing import CHAIN_LENGTH
from sagas.messages import CommandType, EventType
from sagas.states import TenantState
from service.events import build_event
from service.faults import FaultMode
from service.handlers import Request

IN_FLIGHT = 8
RETRY_ANSWER_TIMEOUT_S = 30.0
Numbers = dict[str, float]


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _starter(harness: Harness, kind: str) -> Any:
    return {"saga": harness.start_saga, "floor": harness.start_floor}.get(kind, harness.start_bare)


def _require_completed(harness: Harness, kind: str, runs: list[Started]) -> None:
    if kind == "saga":
        harness.require_state([run.slug for run in runs], TenantState.ACTIVE)


def latency(harness: Harness, kind: str, chains: int) -> Numbers:
    """One chain at a time: per-step start-to-start, hop (end to next start), whole chain."""
    runs = harness.drive(_starter(harness, kind), chains, inflight=1)
    _require_completed(harness, kind, runs)
    stats = [harness.stats(run) for run in runs]
    steps = [value for s in stats for value in s.steps_ms]
    hops = [value for s in stats for value in s.hops_ms]
    totals = [s.total_ms for s in stats]
    return {
        "step_p50_ms": percentile(steps, 50),
        "step_p95_ms": percentile(steps, 95),
        "hop_p50_ms": percentile(hops, 50),
        "hop_p95_ms": percentile(hops, 95),
        "chain_p50_ms": percentile(totals, 50),
        "chain_p95_ms": percentile(totals, 95),
        "chains": float(chains),
    }


def throughput(harness: Harness, kind: str, chains: int) -> tuple[Numbers, list[str]]:
    """``IN_FLIGHT`` chains at a time: steps per second, and the workers' CPU per step."""
    worker = harness.saga_worker if kind == "saga" else harness.bare_worker
    assert worker is not None
    assert harness.consumer is not None
    cpu_before = worker.cpu_seconds()
    consumer_cpu_before = harness.consumer.cpu_seconds()
    outbox_before = harness.outbox_last_id()
    runs = harness.drive(_starter(harness, kind), chains, inflight=IN_FLIGHT)
    cpu_after = worker.cpu_seconds()
    _require_completed(harness, kind, runs)
    stats = [harness.stats(run) for run in runs]
    elapsed = max(s.ended_at for s in stats) - min(s.sent_at for s in stats)
    steps = chains * CHAIN_LENGTH
    result = {
        "steps_per_s": steps / elapsed,
        "chains_per_s": chains / elapsed,
        "worker_cpu_ms_per_step": (cpu_after - cpu_before) * 1000 / steps,
        "step_p50_ms": percentile([v for s in stats for v in s.steps_ms], 50),
        "chain_p50_ms": percentile([s.total_ms for s in stats], 50),
    }
    if kind == "saga":
        events = harness.outbox_last_id() - outbox_before
        result["events"] = float(events)
        result["production_events_per_s"] = events / elapsed
        harness.wait_audit_caught_up()
        consumer_cpu = harness.consumer.cpu_seconds() - consumer_cpu_before
        result["consumer_cpu_ms_per_event"] = consumer_cpu * 1000 / max(events, 1)
    return result, [run.slug for run in runs]


def _burst_bodies(size: int) -> tuple[str, list[tuple[str, str]]]:
    subject = f"{BURST_PREFIX}{uuid.uuid4().hex[:12]}"
    tenant_id = str(uuid.uuid4())
    bodies = []
    for i in range(size):
        data = {
            "tenant_id": tenant_id,
            "slug": subject,
            "state": "provisioning",
            "attempt_number": 1 + i // CHAIN_LENGTH,
            "step": "provision_storage",
            "duration_ms": 1,
            "output": {"ref": f"noop:provision_storage:{subject}:{i}"},
        }
        _event_id, body = build_event(EventType.STEP_COMPLETED, subject, data)
        bodies.append((EventType.STEP_COMPLETED.value, body))
    return subject, bodies


def audit(harness: Harness, lag_slugs: list[str], burst: int) -> Numbers:
    """Lag of the saga phase's events in the audit store; drain rate of a queued burst."""
    consumer = harness.consumer
    assert consumer is not None
    harness.wait_audit_caught_up()
    lags = harness.audit_lags_ms(lag_slugs)
    if not lags:
        raise BenchError("no audit rows for the throughput phase's sagas")
    subject, bodies = _burst_bodies(burst)
    # Held back while the burst is queued, so that what is timed is the consumer alone.
    consumer.pause()
    try:
        harness.services.publisher.publish_events(bodies)
    finally:
        resumed = time.time()
        consumer.resume()
    deadline = time.monotonic() + 120.0
    while harness.audit_count(burst=subject) < burst:
        if time.monotonic() > deadline:
            raise BenchError(
                f"the audit consumer stored {harness.audit_count(burst=subject)}/{burst}"
            )
        time.sleep(0.005)
    drained = time.time()
    return {
        "lag_p50_ms": percentile(lags, 50),
        "lag_p99_ms": percentile(lags, 99),
        "lag_events": float(len(lags)),
        "consumer_events_per_s": burst / (drained - resumed),
        "burst": float(burst),
    }


def _failed_tenants(harness: Harness, count: int) -> list[str]:
    """Tenants whose first attempt failed at ``activate`` (a transient fault, tries spent)."""
    tries = harness.services.settings.step_tries
    slugs = []
    for _ in range(count):
        slug = f"bench-r-{uuid.uuid4().hex[:10]}"
        harness.services.faults.add("activate", mode=FaultMode.ERROR, tenant=slug, times=tries)
        slugs.append(slug)
    for slug in slugs:
        outcome = harness.services.handlers.create(
            Request(CommandType.PROVISION, slug, requested_by="bench"), plan="pro"
        )
        if not outcome.accepted:
            raise BenchError(f"create {slug} was rejected: {outcome.message}")
    harness.wait_state(slugs, TenantState.FAILED)
    return slugs


def _retry_body(slug: str) -> tuple[str, str]:
    command_id = str(uuid.uuid4())
    body = {
        "specversion": "1.0",
        "id": command_id,
        "source": "urn:bench",
        "type": CommandType.RETRY.value,
        "time": datetime.now(UTC).isoformat(),
        "subject": slug,
        "datacontenttype": "application/json",
        "data": {"slug": slug, "requested_by": "bench", "reason": "bench"},
    }
    return command_id, json.dumps(body)


def retry_latency(harness: Harness, commands: int) -> Numbers:
    """A ``tenant.retry_requested`` on tenant.commands to its ``started`` on tenant.events,
    one at a time (each retried saga ends before the next command)."""
    slugs = _failed_tenants(harness, commands)
    latencies: list[float] = []
    with Arrivals(harness.env.broker_url) as arrivals:
        for slug in slugs:
            command_id, body = _retry_body(slug)
            sent = time.time()
            harness.services.publisher.publish_command(CommandType.RETRY.value, body)
            kind, arrived, data = arrivals.wait_retry_answer(
                slug, command_id, RETRY_ANSWER_TIMEOUT_S
            )
            if kind == REJECTED:
                raise BenchError(f"the retry of {slug} was rejected: {data.get('message')}")
            latencies.append((arrived - sent) * 1000)
            harness.wait_state([slug], TenantState.ACTIVE)
    return {
        "started_p50_ms": percentile(latencies, 50),
        "started_p95_ms": percentile(latencies, 95),
        "commands": float(commands),
    }


def rss_growth(harness: Harness, sagas: int) -> Numbers:
    """The saga worker's RSS (main process and pool), before and after ``sagas`` sagas."""
    worker = harness.saga_worker
    assert worker is not None
    before = worker.rss_bytes()
    started = time.monotonic()
    runs = harness.drive(harness.start_saga, sagas, inflight=IN_FLIGHT)
    harness.require_state([run.slug for run in runs], TenantState.ACTIVE)
    elapsed = time.monotonic() - started
    after = worker.rss_bytes()
    return {
        "sagas": float(sagas),
        "before_mb": before / 2**20,
        "after_mb": after / 2**20,
        "growth_pct": (after - before) * 100 / before,
        "processes": float(len(worker.tree())),
        "elapsed_s": elapsed,
    }
