"""Issue 7: real Flower, fed by the worker's task events, shows each saga step as a named task
with the tenant's slug and attempt number in its arguments."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config.celery import celery_config
from config.settings import get_settings
from sagas.messages import CommandType
from sagas.steps import STEPS
from service.bootstrap import Container
from service.handlers import Request
from tests.support.api import wait_until
from tests.support.environment import free_port
from tests.support.events import EventTap, new_slug, settled
from tests.support.processes import PYTHON, ServiceProcess

pytestmark = pytest.mark.integration


class Flower:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / "flower.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Flower:
        env = dict(os.environ)
        env["FLOWER_UNAUTHENTICATED_API"] = "true"  # Flower 2 serves /api/* only with auth else
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # Flower's own metrics are not ours
        argv = [
            PYTHON,
            "-m",
            "celery",
            "--app",
            "tasks.app",
            "--broker",
            get_settings().broker_url,
            "flower",
            f"--port={self.port}",
            "--address=127.0.0.1",
        ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        wait_until(self._healthy, 60, f"Flower to answer; log:\n{self._log()[-2000:]}", 0.3)
        return self

    def _log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"Flower exited; log:\n{self._log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthcheck", timeout=2) as response:  # noqa: S310
                return bool(response.status == 200)
        except OSError:
            return False

    def tasks(self) -> dict[str, dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/tasks?limit=5000", timeout=10) as response:  # noqa: S310
            result: dict[str, dict[str, Any]] = json.loads(response.read())
        return result

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def flower(workdir: Path) -> Iterator[Flower]:
    process = Flower(workdir).start()
    yield process
    process.stop()


def create(services: Container, slug: str) -> str:
    outcome = services.handlers.create(Request(CommandType.PROVISION, slug), plan="pro")
    assert outcome.accepted, outcome
    assert outcome.tenant_id is not None
    return outcome.tenant_id


def tasks_of(flower: Flower, slug: str) -> list[dict[str, Any]]:
    return [t for t in flower.tasks().values() if f"'slug': '{slug}'" in str(t.get("kwargs"))]


def test_the_worker_sends_the_events_flower_needs() -> None:
    config = celery_config(get_settings())
    assert config["worker_send_task_events"] is True
    assert config["task_send_sent_event"] is True


def test_flower_shows_each_step_with_slug_and_attempt(
    services: Container, worker: ServiceProcess, tap: EventTap, flower: Flower
) -> None:
    # Flower sees only events sent after it subscribed: wait until it sees a first saga.
    warm_up = new_slug("flower-warm")
    create(services, warm_up)
    wait_until(lambda: tasks_of(flower, warm_up), 60, "Flower to see a first task")

    slug = new_slug("flower")
    tenant_id = create(services, slug)
    tap.wait_for(settled, slug, 60)

    def every_step_succeeded() -> list[dict[str, Any]]:
        found = tasks_of(flower, slug)
        names = {t.get("name") for t in found if t.get("state") == "SUCCESS"}
        return found if {f"provisioner.step.{step}" for step in STEPS} <= names else []

    found = wait_until(every_step_succeeded, 30, f"Flower to show the steps of {slug}")
    by_name = {t["name"]: t for t in found if t.get("name")}
    for step in STEPS:
        task = by_name[f"provisioner.step.{step}"]
        assert task["state"] == "SUCCESS"
        assert f"'slug': '{slug}'" in task["kwargs"], task
        assert "'attempt_number': 1" in task["kwargs"], task
        # The tenant its provider is told travels with the step (service/dispatch.py).
        assert f"'tenant_id': '{tenant_id}'" in task["kwargs"], task
        assert "'plan': 'pro'" in task["kwargs"], task
        assert task.get("worker"), task  # received by a named worker node
