"""The HTTP API's access rules and the tenant page's actions, without I/O."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from service.api.actions import available_actions
from service.api.auth import is_loopback, token_matches


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.8.7", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("172.17.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("203.0.113.9", False),
        ("localhost", False),  # a name is not an address: nothing is taken on trust
        ("testclient", False),
        ("", False),
        (None, False),
    ],
)
def test_loopback_means_a_loopback_address(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_tokens_must_match_exactly() -> None:
    token = SecretStr("s3cret")
    assert token_matches("s3cret", token)
    assert not token_matches("s3cret ", token)
    assert not token_matches("S3CRET", token)
    assert not token_matches("", token)
    assert not token_matches(None, token)
    assert not token_matches("s3cret", None)  # no token configured: nothing matches


def tenant(state: str, attempts: int = 1, **extra: Any) -> dict[str, Any]:
    runs = [
        {"retryable": True, "attempt_number": n + 1, "failed_step": None} for n in range(attempts)
    ]
    if "retryable" in extra:
        runs[-1]["retryable"] = extra.pop("retryable")
    if "failed_step" in extra:
        runs[-1]["failed_step"] = extra.pop("failed_step")
    return {
        "slug": "acme",
        "state": state,
        "max_retries": 2,
        "attempts": runs,
        "lock": {"held": extra.pop("lock_held", False)},
        **extra,
    }


def actions(detail: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    return {a["name"]: (a["enabled"], a["why"]) for a in available_actions(detail)}


def test_a_failed_tenant_can_be_retried_until_the_cap_then_only_forced() -> None:
    first = actions(tenant("failed", attempts=1))
    assert first["retry"] == (True, "0 of 2 retries used; resumes where the last attempt failed")
    assert first["retry_force"][0] is False
    assert first["reset"] == (False, "tenant is failed and holds no lock: nothing to reset")
    assert first["decommission"][0] is True
    capped = actions(tenant("failed", attempts=3))
    assert capped["retry"] == (False, "2 of 2 retries used: escalate, or retry with force")
    assert capped["retry_force"] == (True, "past the cap (2 of 2 retries used)")


def test_what_each_state_allows() -> None:
    provisioning = actions(tenant("provisioning", lock_held=True))
    assert provisioning["retry"] == (False, "tenant is provisioning: reset first")
    assert provisioning["reset"][0] is True
    assert provisioning["decommission"] == (
        False,
        "tenant is provisioning: wait for it to end, or reset first",
    )
    active = actions(tenant("active"))
    assert active["retry"] == (False, "tenant is active: nothing to retry")
    assert active["reset"][0] is False
    assert active["decommission"][0] is True
    gone = actions(tenant("decommissioned"))
    assert not any(enabled for enabled, _ in gone.values())
    assert gone["retry"][1] == "tenant is decommissioned"
    invalid = actions(tenant("failed", retryable=False, failed_step="validate"))
    assert invalid["retry"] == (
        False,
        "validation failed, which no retry can fix: decommission and recreate",
    )
    refused = actions(tenant("failed", retryable=False, failed_step="issue_certificate"))
    assert refused["retry"] == (
        False,
        "issue_certificate failed for good: decommission and recreate",
    )
    stale = actions(tenant("failed", lock_held=True))
    assert stale["retry"][0] is False
    assert "reset first" in stale["retry"][1]
    assert stale["reset"] == (True, "release the lock still held although no run is going on")
    assert stale["decommission"][0] is False
