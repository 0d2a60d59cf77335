"""Issue 7: the HTTP API, as a real ``provisioner api`` process, on a real worker and database.

Every change goes through the same handlers as the bus and the CLI; reads show what the CLI
shows; access is by bearer token, reads open on loopback. A schemathesis run finds no 500.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from service.bootstrap import Container
from service.faults import FaultMode
from tests.support.api import API_TOKEN, Answer, ApiServer, call, start_api, wait_until
from tests.support.events import EventTap, new_slug
from tests.support.processes import PYTHON, ServiceProcess

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture(scope="module")
def api(workdir: Path) -> Iterator[ApiServer]:
    server = start_api(workdir, name="api-test")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def audit(workdir: Path) -> Iterator[ServiceProcess]:
    consumer = ServiceProcess("audit-api-test", ["consume"], workdir).start()
    consumer.wait_ready("audit.started", timeout=30)
    yield consumer
    consumer.stop()


def post(api: ApiServer, path: str, body: Any = None, **kw: Any) -> Answer:
    return call(f"{api.url}{path}", "POST", body if body is not None else {}, token=API_TOKEN, **kw)


def get(api: ApiServer, path: str, **kw: Any) -> Answer:
    return call(f"{api.url}{path}", **kw)


def detail(api: ApiServer, slug: str) -> dict[str, Any]:
    answer = get(api, f"/api/tenants/{slug}")
    assert answer.status == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def wait_state(api: ApiServer, slug: str, state: str, timeout: float = 45) -> dict[str, Any]:
    return dict(
        wait_until(
            lambda: (d := detail(api, slug))["state"] == state and not d["lock"]["held"] and d,
            timeout,
            f"{slug} to be {state}",
        )
    )


def action(d: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in d["actions"] if a["name"] == name)


def cli_json(*args: str) -> Any:
    done = subprocess.run(
        [PYTHON, "-m", "service", *args, "--json"], capture_output=True, timeout=60, check=True
    )
    return json.loads(done.stdout)


def normalised(value: Any) -> Any:
    """Timestamps compared as instants (the CLI prints isoformat, the API RFC 3339)."""
    if isinstance(value, dict):
        return {k: normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(v) for v in value]
    if isinstance(value, str) and len(value) >= 19 and value[4:5] == "-" and value[10:11] == "T":
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return value


# --- access ---
def test_changes_need_the_bearer_token(api: ApiServer) -> None:
    url = f"{api.url}/api/tenants"
    body = {"slug": new_slug("auth"), "plan": "pro"}
    missing = call(url, "POST", body)
    assert missing.status == 401
    assert missing.json()["reason"] == "unauthorized"
    assert "Bearer" in missing.json()["message"]
    assert missing.headers.get("www-authenticate", "").startswith("Bearer")
    wrong = call(url, "POST", body, token=API_TOKEN + "x")
    assert wrong.status == 401
    basic = call(url, "POST", body, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status == 401
    # Nothing was created by the refused calls.
    assert get(api, f"/api/tenants/{body['slug']}").status == 404


def test_changes_are_refused_when_no_token_is_configured(workdir: Path) -> None:
    server = start_api(workdir, token=None, name="api-no-token")
    try:
        answer = call(f"{server.url}/api/tenants", "POST", {"slug": "x-y-z", "plan": "pro"})
        assert answer.status == 403
        assert answer.json()["reason"] == "changes_disabled"
        assert "PROVISIONER_API_TOKEN" in answer.json()["message"]
        # Even a token is no use: there is none to match.
        assert call(f"{server.url}/api/tenants/x-y-z/reset", "POST", {}, token="x").status == 403
        assert get(server, "/api/tenants").status == 200  # reads stay open on loopback
    finally:
        server.stop()


def test_reads_are_open_on_loopback_only(api: ApiServer) -> None:
    assert get(api, "/api/tenants").status == 200
    assert get(api, "/metrics").status == 200
    # uvicorn trusts X-Forwarded-For from 127.0.0.1: the client is then that remote address.
    remote = {"X-Forwarded-For": "203.0.113.9"}
    answer = get(api, "/api/tenants", headers=remote)
    assert answer.status == 401
    assert "token" in answer.json()["message"]
    assert get(api, "/metrics", headers=remote).status == 401
    assert get(api, "/api/tenants", headers={**remote, **AUTH}).status == 200
    page = get(api, "/tenants", headers=remote)
    assert page.status == 401
    assert "token-input" in page.text  # the page offers the token field
    cookie = {**remote, "Cookie": f"provisioner_token={API_TOKEN}"}
    assert get(api, "/tenants", headers=cookie).status == 200
    # The pages' cookie never authorises a change.
    refused = call(
        f"{api.url}/api/tenants", "POST", {"slug": "c-o-o", "plan": "pro"}, headers=cookie
    )
    assert refused.status == 401


# --- the contract through HTTP ---
def test_openapi_describes_every_operation(api: ApiServer) -> None:
    document = get(api, "/openapi.json").json()
    operations = {
        (method.upper(), path): op
        for path, item in document["paths"].items()
        for method, op in item.items()
    }
    expected = {
        ("GET", "/api/tenants"),
        ("GET", "/api/tenants/{slug}"),
        ("GET", "/api/tenants/{slug}/timeline"),
        ("GET", "/api/tenants/{slug}/diff"),
        ("POST", "/api/tenants"),
        ("POST", "/api/tenants/{slug}/retry"),
        ("POST", "/api/tenants/{slug}/reset"),
        ("POST", "/api/tenants/{slug}/decommission"),
        ("GET", "/metrics"),
    }
    assert expected <= set(operations), sorted(set(operations))
    for key, op in operations.items():
        assert op.get("summary"), f"{key} has no summary"
        assert op.get("description"), f"{key} has no description"
    for key in [k for k in expected if k[0] == "POST"]:
        responses = operations[key]["responses"]
        assert {"202", "401", "403", "409", "422"} <= set(responses), (key, sorted(responses))
        problem = responses["409"]["content"]["application/json"]["schema"]["$ref"]
        assert problem.endswith("/Problem")
    schemas = document["components"]["schemas"]
    assert {"TenantDetail", "TenantSummary", "Timeline", "Diff", "Accepted", "Problem"} <= set(
        schemas
    )
    assert "bearer" in document["components"]["securitySchemes"]
    assert get(api, "/docs").status == 404  # no CDN-loaded docs page


def test_create_retry_reset_decommission_through_the_api(
    services: Container, worker: ServiceProcess, api: ApiServer, audit: ServiceProcess
) -> None:
    ok, flaky = new_slug("api-ok"), new_slug("api-flaky")
    created = post(api, "/api/tenants", {"slug": ok, "plan": "pro", "admin_email": "a@b.test"})
    assert created.status == 202, created.text
    assert created.json()["accepted"] is True
    assert created.json()["event_type"] == "tenant.provisioning.started"
    active = wait_state(api, ok, "active")
    assert active["admin_console_url"].endswith(f"/console/{ok}")
    assert [a["state"] for a in active["attempts"]] == ["succeeded"]
    taken = post(api, "/api/tenants", {"slug": ok, "plan": "pro"})
    assert taken.status == 409
    assert taken.json()["reason"] == "slug_taken"
    not_failed = post(api, f"/api/tenants/{ok}/retry")
    assert (not_failed.status, not_failed.json()["reason"]) == (409, "not_failed")

    services.faults.add("issue_certificate", mode=FaultMode.ERROR, tenant=flaky)
    assert post(api, "/api/tenants", {"slug": flaky, "plan": "free"}).status == 202
    failed = wait_state(api, flaky, "failed")
    assert failed["last_failure"]["step"] == "issue_certificate"
    assert action(failed, "retry")["enabled"]
    for number in (2, 3):
        answer = post(api, f"/api/tenants/{flaky}/retry", {"reason": "try again"})
        assert answer.status == 202, answer.text
        assert answer.json()["attempt_number"] == number
        failed = wait_state(api, flaky, "failed")
    assert failed["last_failure"]["repeated_failure"] is True
    capped = post(api, f"/api/tenants/{flaky}/retry")
    assert capped.status == 409
    assert capped.json()["reason"] == "retry_cap_reached"
    assert "force" in capped.json()["message"]
    assert action(failed, "retry") == {
        "name": "retry",
        "enabled": False,
        "why": "2 of 2 retries used: escalate, or retry with force",
    }
    assert action(failed, "retry_force")["enabled"]
    for plan in services.faults.list():
        if plan.tenant == flaky:
            services.faults.clear(plan.id)
    forced = post(api, f"/api/tenants/{flaky}/retry", {"force": True})
    assert forced.status == 202, forced.text
    assert forced.json()["details"]["resumed_from"] == "issue_certificate"
    active = wait_state(api, flaky, "active")
    assert len(active["attempts"]) == 4

    # The list filters by state; the reads agree with the CLI's.
    listed = get(api, "/api/tenants?state=active").json()
    assert {ok, flaky} <= {t["slug"] for t in listed}
    assert all(t["state"] == "active" for t in listed)
    assert get(api, "/api/tenants?state=bogus").status == 422
    assert normalised(detail(api, flaky)["attempts"]) == normalised(
        cli_json("show", flaky)["attempts"]
    )
    wait_until(
        lambda: any(
            r["outcome"] == "completed" and r["attempt_number"] == 4
            for r in get(api, f"/api/tenants/{flaky}/timeline").json()["runs"]
        ),
        30,
        "the audit store to have attempt 4 completed",
    )
    timeline = get(api, f"/api/tenants/{flaky}/timeline").json()
    assert normalised(timeline) == normalised(cli_json("timeline", flaky))
    one = get(api, f"/api/tenants/{flaky}/timeline?attempt=2").json()
    assert normalised(one) == normalised(cli_json("timeline", flaky, "--attempt", "2"))
    assert get(api, f"/api/tenants/{flaky}/timeline?attempt=9").status == 404
    diff = get(api, f"/api/tenants/{flaky}/diff?a=3&b=4").json()
    assert diff["first_divergence"] == "issue_certificate"
    assert normalised(diff) == normalised(cli_json("diff", flaky, "3", "4"))
    assert get(api, f"/api/tenants/{ok}/diff").status == 404  # one attempt: nothing to compare
    assert get(api, f"/api/tenants/{flaky}/diff?a=3").status == 422

    gone = post(api, f"/api/tenants/{ok}/decommission", {"requested_by": "ops"})
    assert gone.status == 202, gone.text
    wait_state(api, ok, "decommissioned")
    again = post(api, f"/api/tenants/{ok}/decommission")
    assert (again.status, again.json()["reason"]) == (409, "already_decommissioned")


def test_reset_a_stuck_tenant_through_the_api(
    services: Container, worker: ServiceProcess, api: ApiServer, tap: EventTap
) -> None:
    slug = new_slug("api-stuck")
    services.faults.add("register_workflows", mode=FaultMode.HANG, tenant=slug)
    try:
        assert post(api, "/api/tenants", {"slug": slug, "plan": "pro"}).status == 202
        tap.wait_for(
            lambda evs: any(e["data"].get("step") == "register_workflows" for e in evs), slug, 30
        )
        stuck = detail(api, slug)
        assert stuck["state"] == "provisioning"
        assert stuck["lock"]["held"]
        assert stuck["lock"]["holder_attempt_number"] == 1
        assert action(stuck, "retry") == {
            "name": "retry",
            "enabled": False,
            "why": "tenant is provisioning: reset first",
        }
        assert action(stuck, "reset")["enabled"]
        locked = post(api, f"/api/tenants/{slug}/retry")
        assert (locked.status, locked.json()["reason"]) == (409, "locked")
        assert "reset first" in locked.json()["message"]
        assert post(api, f"/api/tenants/{slug}/decommission").json()["reason"] == "locked"
        reset = post(api, f"/api/tenants/{slug}/reset")
        assert reset.status == 202, reset.text
        assert reset.json()["details"] == {"reset_attempt": 1, "lock_released": True}
        after = detail(api, slug)
        assert after["state"] == "failed"
        assert not after["lock"]["held"]
        assert after["attempts"][0]["state"] == "reset"
    finally:
        for plan in services.faults.list():
            if plan.tenant == slug:
                services.faults.clear(plan.id)
    retried = post(api, f"/api/tenants/{slug}/retry")
    assert retried.status == 202, retried.text
    assert wait_state(api, slug, "active")["attempts"][-1]["resumed_from"] == "register_workflows"


def test_unknown_slugs_and_malformed_requests(api: ApiServer) -> None:
    slug = new_slug("nobody")
    for path in (f"/api/tenants/{slug}", f"/api/tenants/{slug}/timeline"):
        answer = get(api, path)
        assert answer.status == 404
        assert answer.json()["reason"] == "unknown_tenant"
        assert slug in answer.json()["message"]
    for verb in ("retry", "reset", "decommission"):
        answer = post(api, f"/api/tenants/{slug}/{verb}")
        assert (answer.status, answer.json()["reason"]) == (404, "unknown_tenant")
    malformed = [
        {"slug": slug},  # no plan
        {"slug": slug, "plan": 3},
        {"slug": "bad\u0000slug", "plan": "pro"},
        {"slug": slug, "plan": "pro", "colour": "red"},
    ]
    for body in malformed:
        answer = post(api, "/api/tenants", body)
        assert answer.status == 422, (body, answer.text)
        assert answer.json()["reason"] == "malformed"
        assert answer.json()["errors"]
    not_json = call(
        f"{api.url}/api/tenants",
        "POST",
        token=API_TOKEN,
        headers={"Content-Type": "application/json"},
    )
    assert not_json.status == 422
    assert post(api, f"/api/tenants/{slug}/retry", {"force": "very"}).status == 422
    assert get(api, "/api/nothing-here").json()["reason"] == "not_found"


def test_an_idempotency_key_acts_once(
    services: Container, worker: ServiceProcess, api: ApiServer
) -> None:
    slug, key = new_slug("api-idem"), str(uuid.uuid4())
    first = post(
        api, "/api/tenants", {"slug": slug, "plan": "pro"}, headers={"Idempotency-Key": key}
    )
    second = post(
        api, "/api/tenants", {"slug": slug, "plan": "pro"}, headers={"Idempotency-Key": key}
    )
    assert first.status == second.status == 202
    assert (first.json()["duplicate"], second.json()["duplicate"]) == (False, True)
    assert second.json()["command_id"] == key
    assert len(wait_state(api, slug, "active")["attempts"]) == 1


def test_schemathesis_finds_no_server_error(api: ApiServer) -> None:
    """Generated requests (valid and invalid, ~25 per operation and mode) never get a 500, and
    every answer matches the documented status codes, content types and schemas."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.result import Ok
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    ran: list[str] = []
    calls: list[str] = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=25,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def exercise(case: Any) -> None:
                case.call_and_validate(base_url=api.url, headers=dict(AUTH), checks=checks)
                calls.append(case.operation.label)

            exercise()
            ran.append(f"{operation.label} {mode.value}")
    assert len(ran) >= 18, ran
    assert len(calls) >= 200, len(calls)
