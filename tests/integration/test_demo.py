"""Issue 9: ``provisioner demo`` tells the whole story against the running service.

The session's worker is the running service: the demo must find it and start nothing of its own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from sqlmodel import Session, select

from service.bootstrap import Container
from service.db.models import Tenant
from tests.support.processes import ServiceProcess

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_demo_walks_the_story_against_the_running_worker(
    services: Container, worker: ServiceProcess
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "demo", "--timeout", "60"],
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = result.stdout
    print(output)  # shown when an assertion below fails
    assert result.returncode == 0, f"stdout:\n{output}\nstderr:\n{result.stderr}"
    assert "Using the running service" in output
    assert "starting `provisioner up`" not in output

    acme = re.search(r"\$ provisioner create (demo-[0-9a-f]{4}-acme) --plan pro", output)
    assert acme is not None, output
    slug = acme.group(1)
    beta, gamma = slug.replace("-acme", "-beta"), slug.replace("-acme", "-gamma")
    # 1. provisioned, with its admin console link
    assert f"{slug} is active" in output
    assert f"Admin Console: http://127.0.0.1:8080/console/{slug}" in output
    # 2. the failed step and the failed event
    assert f"{beta} is failed" in output
    assert "Failed at issue_certificate" in output
    assert '"failed_activity": "issue_certificate"' in output
    # 3. the retry resumes at the failed step, reusing the steps before it
    assert (
        "resuming at issue_certificate (reusing validate, reserve_slot, provision_storage, "
        "register_workflows)" in output
    )
    assert f"$ provisioner diff {beta}" in output
    assert f"{beta} is active" in output
    # 4. stuck: retry refused `locked`, reset, retry, active
    assert f"$ provisioner faults add register_workflows --tenant {gamma} --mode hang" in output
    assert f"rejected (locked): tenant '{gamma}' is locked" in output
    assert f"$ provisioner reset {gamma}" in output
    assert f"attempt 1 of {gamma} reset" in output
    assert f"{gamma} is active" in output
    # 5. decommissioned, and the slug reused by a new tenant
    assert f"{slug} is decommissioned" in output
    assert f"slug {slug} reused by a new tenant" in output

    with Session(services.engine) as session:
        tenants = session.exec(select(Tenant).where(Tenant.slug == slug)).all()
        states = sorted(t.state for t in tenants)
        assert states == ["active", "decommissioned"]
        assert session.exec(select(Tenant).where(Tenant.slug == gamma)).one().state == "active"
