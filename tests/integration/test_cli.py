"""The operator CLI as an operator runs it: a subprocess, exit codes, stdout and stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from service.bootstrap import Container
from tests.support.events import EventTap, new_slug
from tests.support.processes import ServiceProcess

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )


def test_create_show_list_lock_and_faults_from_the_cli(
    services: Container, worker: ServiceProcess, tap: EventTap
) -> None:
    slug = new_slug("cli")
    added = cli("faults", "add", "register_workflows", "--tenant", slug, "--times", "1", "--json")
    assert added.returncode == 0, added.stderr
    plan = json.loads(added.stdout)
    assert (plan["step"], plan["tenant"], plan["mode"], plan["times"]) == (
        "register_workflows",
        slug,
        "error",
        1,
    )
    listed = json.loads(cli("faults", "list", "--json").stdout)
    assert plan["id"] in {p["id"] for p in listed}

    created = cli("create", slug, "--plan", "pro", "--requested-by", "alice")
    assert created.returncode == 0, created.stderr
    assert f"provisioning {slug} started" in created.stdout
    tap.wait_for_type(slug, "tenant.provisioning.completed")

    shown = json.loads(cli("show", slug, "--json").stdout)
    assert shown["state"] == "active"
    assert shown["admin_console_url"].endswith(f"/console/{slug}")
    [attempt] = shown["attempts"]
    assert attempt["requested_by"] == "alice"
    workflows = next(s for s in attempt["steps"] if s["step"] == "register_workflows")
    assert workflows["tries"] == 2
    assert shown["lock"]["held"] is False

    active = json.loads(cli("list", "--state", "active", "--json").stdout)
    assert slug in {t["slug"] for t in active}
    lock = json.loads(cli("lock", slug, "--json").stdout)
    assert lock == {
        "slug": slug,
        "held": False,
        "holder_run_id": None,
        "epoch": None,
        "age_s": None,
        "ttl_s": None,
    }
    human = cli("show", slug)
    assert "register_workflows" in human.stdout
    assert "active" in human.stdout


def test_a_rejection_exits_non_zero_with_the_reason_on_stderr(services: Container) -> None:
    slug = new_slug("nobody")
    for command in (["retry", slug], ["reset", slug], ["decommission", slug]):
        result = cli(*command)
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.startswith("rejected (unknown_tenant): ")
        assert "provision it first" in result.stderr


def test_unknown_step_and_tenant_are_clear_errors(services: Container) -> None:
    bad = cli("faults", "add", "nope")
    assert bad.returncode == 2
    assert "unknown step 'nope'" in bad.stderr
    missing = cli("show", new_slug("ghost"))
    assert missing.returncode == 1
    assert "no tenant" in missing.stderr
