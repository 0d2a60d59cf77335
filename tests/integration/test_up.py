"""`provisioner up`: one supervised group that provisions, restarts a dead child, stops cleanly."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from sagas.messages import CommandType
from service.bootstrap import Container
from service.handlers import Request
from tests.support.api import EnvServiceProcess, wait_until
from tests.support.environment import free_port
from tests.support.events import EventTap, new_slug
from tests.support.processes import ServiceProcess

pytestmark = pytest.mark.integration


def child_running(up: ServiceProcess, argv_part: str) -> list[psutil.Process]:
    found = []
    for child in up.children():
        try:
            if argv_part in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_up_runs_the_service_restarts_a_dead_child_and_stops_on_sigterm(
    services: Container, tap: EventTap, workdir: Path
) -> None:
    # The API port is picked now, not when the session started minutes ago.
    api_bind: dict[str, str | None] = {"PROVISIONER_API_BIND": f"127.0.0.1:{free_port()}"}
    up = EnvServiceProcess(
        f"up-{new_slug('u')}", ["up", "--concurrency", "1"], workdir, api_bind
    ).start()
    try:
        up.wait_ready("listener.started", timeout=90)
        up.wait_ready("ready.", timeout=90)  # the Celery worker

        slug = new_slug("up")
        services.handlers.create(Request(CommandType.PROVISION, slug), plan="pro")
        tap.wait_for_type(slug, "tenant.provisioning.completed", timeout=60)

        [listener] = child_running(up, "service listen")
        os.kill(listener.pid, signal.SIGKILL)
        wait_until(lambda: "supervisor.restarting" in up.log_text(), 60, "the restart")
        wait_until(
            lambda: any(p.pid != listener.pid for p in child_running(up, "service listen")),
            60,
            "a new listener",
        )

        children = up.children()
        assert up.process is not None
        os.kill(up.pid, signal.SIGTERM)  # the supervisor only, as an init system would
        assert up.process.wait(timeout=60) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"children left running: {[p.pid for p in alive]}"
        assert "supervisor.stopped" in up.log_text()
    finally:
        up.stop()
