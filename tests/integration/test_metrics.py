"""Issue 7: ``/metrics`` adds up what every process recorded and reads the gauges at scrape time.

The story runs through the API process (commands) and the worker's prefork children (steps),
so the numbers can only be right if the multiprocess files under ``<data_dir>/metrics`` work.
Counters belong to the whole test session: every check is a difference from a first scrape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session, col, select

from service.bootstrap import Container
from service.db.models import AuditEvent
from service.faults import FaultMode
from tests.support.api import API_TOKEN, ApiServer, call, start_api, wait_until
from tests.support.events import EventTap, new_slug
from tests.support.processes import ServiceProcess

pytestmark = pytest.mark.integration

Sample = tuple[str, tuple[tuple[str, str], ...]]
LAG: Sample = ("provisioner_audit_lag_seconds", ())


@pytest.fixture(scope="module")
def api(workdir: Path) -> Iterator[ApiServer]:
    server = start_api(workdir, name="api-metrics")
    yield server
    server.stop()


def scrape(api: ApiServer) -> dict[Sample, float]:
    answer = call(f"{api.url}/metrics")
    assert answer.status == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def key(name: str, **labels: str) -> Sample:
    return (name, tuple(sorted(labels.items())))


def delta(before: dict[Sample, float], after: dict[Sample, float]) -> Counter[Sample]:
    changed: Counter[Sample] = Counter()
    for sample, value in after.items():
        if sample[0].endswith(("_total", "_count")):
            diff = value - before.get(sample, 0.0)
            if diff:
                changed[sample] = int(diff)
    return changed


def command(api: ApiServer, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    answer = call(f"{api.url}{path}", "POST", body or {}, token=API_TOKEN)
    assert answer.status in (202, 404, 409), answer.text
    result: dict[str, Any] = answer.json()
    return result


def settled(api: ApiServer, slug: str, state: str) -> None:
    def done() -> bool:
        d = call(f"{api.url}/api/tenants/{slug}").json()
        return bool(d["state"] == state and not d["lock"]["held"])

    wait_until(done, 45, f"{slug} to be {state}")


def test_metrics_count_what_happened(
    services: Container, worker: ServiceProcess, api: ApiServer, tap: EventTap
) -> None:
    ok, flaky = new_slug("m-ok"), new_slug("m-flaky")
    before = scrape(api)

    assert command(api, "/api/tenants", {"slug": ok, "plan": "pro"})["accepted"]
    settled(api, ok, "active")
    services.faults.add("issue_certificate", mode=FaultMode.ERROR, tenant=flaky)
    assert command(api, "/api/tenants", {"slug": flaky, "plan": "pro"})["accepted"]
    settled(api, flaky, "failed")
    assert command(api, f"/api/tenants/{flaky}/retry")["accepted"]  # fails again: repeated
    settled(api, flaky, "failed")
    assert command(api, f"/api/tenants/{ok}/retry")["reason"] == "not_failed"
    assert command(api, f"/api/tenants/{new_slug('m-none')}/retry")["reason"] == "unknown_tenant"
    for plan in services.faults.list():
        if plan.tenant == flaky:
            services.faults.clear(plan.id)
    assert command(api, f"/api/tenants/{flaky}/retry")["accepted"]
    settled(api, flaky, "active")

    transient = "TransientUpstreamError"
    expected = {
        key("provisioner_attempts_started_total", trigger="create"): 2,
        key("provisioner_attempts_started_total", trigger="retry"): 2,
        key("provisioner_attempts_ended_total", outcome="completed"): 2,
        key("provisioner_attempts_ended_total", outcome="failed"): 2,
        key("provisioner_step_failures_total", step="issue_certificate", error_type=transient): 2,
        # PROVISIONER_STEP_TRIES=3: two automatic retries before each failure.
        key("provisioner_step_retries_total", step="issue_certificate", error_type=transient): 4,
        key("provisioner_repeated_failures_total", step="issue_certificate"): 1,
        key("provisioner_retries_refused_total", reason="not_failed"): 1,
        key("provisioner_retries_refused_total", reason="unknown_tenant"): 1,
        key(
            "provisioner_commands_rejected_total",
            command_type="tenant.retry_requested",
            reason="not_failed",
        ): 1,
        key(
            "provisioner_commands_rejected_total",
            command_type="tenant.retry_requested",
            reason="unknown_tenant",
        ): 1,
        # Steps timed: every completed step of ok's attempt and of flaky's three attempts
        # (the retries resume at issue_certificate; the steps before it are reused, not run).
        key("provisioner_step_duration_seconds_count", step="validate"): 2,
        key("provisioner_step_duration_seconds_count", step="provision_storage"): 2,
        key("provisioner_step_duration_seconds_count", step="issue_certificate"): 2,
        key("provisioner_step_duration_seconds_count", step="activate"): 2,
    }

    def matches() -> bool:
        changed = delta(before, scrape(api))
        return all(changed.get(sample, 0) == count for sample, count in expected.items())

    wait_until(matches, 15, "the counters of the story")
    changed = delta(before, scrape(api))
    assert {s: changed.get(s, 0) for s in expected} == expected
    # Nothing else moved in the attempt counters: no reset, no other trigger.
    attempts = {s: n for s, n in changed.items() if s[0].startswith("provisioner_attempts_")}
    assert attempts == {s: n for s, n in expected.items() if s[0].startswith("provisioner_attempt")}

    after = scrape(api)
    assert after[key("provisioner_tenants", state="active")] >= 2
    assert after[key("provisioner_outbox_backlog")] >= 0
    assert after[key("provisioner_scrape_errors", source="redis")] == 0
    assert after[key("provisioner_scrape_errors", source="database")] == 0
    buckets = [
        (float(dict(labels)["le"]), value)
        for (name, labels), value in after.items()
        if name == "provisioner_step_duration_seconds_bucket" and dict(labels)["step"] == "activate"
    ]
    assert buckets
    assert (
        sorted(buckets)[-1][1]
        == after[key("provisioner_step_duration_seconds_count", step="activate")]
    )


def test_lock_gauges_show_a_stuck_saga_and_reset_ends_it(
    services: Container, worker: ServiceProcess, api: ApiServer, tap: EventTap
) -> None:
    slug = new_slug("m-stuck")
    services.faults.add("register_workflows", mode=FaultMode.HANG, tenant=slug)
    before = scrape(api)
    try:
        assert command(api, "/api/tenants", {"slug": slug, "plan": "pro"})["accepted"]
        tap.wait_for(
            lambda evs: any(e["data"].get("step") == "register_workflows" for e in evs), slug, 30
        )
        during = scrape(api)
        assert during[key("provisioner_locks_held")] >= 1
        age = during[key("provisioner_lock_age_seconds", slug=slug)]
        assert 0 <= age < 60
        assert 0 < during[key("provisioner_lock_ttl_seconds", slug=slug)] <= 120
        assert during[key("provisioner_lock_oldest_age_seconds")] >= age
        assert command(api, f"/api/tenants/{slug}/retry")["reason"] == "locked"
        assert command(api, f"/api/tenants/{slug}/reset")["accepted"]
    finally:
        for plan in services.faults.list():
            if plan.tenant == slug:
                services.faults.clear(plan.id)
    after = scrape(api)
    assert key("provisioner_lock_age_seconds", slug=slug) not in after
    changed = delta(before, after)
    assert changed[key("provisioner_attempts_ended_total", outcome="reset")] == 1
    assert changed[key("provisioner_retries_refused_total", reason="locked")] == 1


def test_audit_lag_is_read_from_the_audit_store(
    services: Container, worker: ServiceProcess, api: ApiServer, workdir: Path
) -> None:
    consumer = ServiceProcess("audit-metrics", ["consume"], workdir).start()
    try:
        consumer.wait_ready("audit.started", timeout=30)
        slug = new_slug("m-audit")
        assert command(api, "/api/tenants", {"slug": slug, "plan": "pro"})["accepted"]
        settled(api, slug, "active")
        wait_until(lambda: stored(services, slug), 30, "the tenant's events in the audit store")
    finally:
        consumer.stop()
    # The store is still now: the gauge must say what its newest row says. (The session's
    # audit queue holds every earlier test's events too, so the lag's size says nothing.)
    [lag] = [v for s, v in scrape(api).items() if s == key("provisioner_audit_lag_seconds")]
    with Session(services.engine) as session:
        received_at, time = session.exec(
            select(AuditEvent.received_at, AuditEvent.time)
            .where(col(AuditEvent.time).is_not(None))
            .order_by(col(AuditEvent.seq).desc())
            .limit(1)
        ).one()
    assert time is not None
    expected = (aware(received_at) - aware(time)).total_seconds()
    assert lag == pytest.approx(max(0.0, expected), abs=1e-3)


def aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def stored(services: Container, slug: str) -> bool:
    with Session(services.engine) as session:
        return (
            session.exec(
                select(AuditEvent.event_id).where(
                    AuditEvent.subject == slug,
                    AuditEvent.type == "tenant.provisioning.completed",
                )
            ).first()
            is not None
        )
