"""A deployment of the service's processes with an environment of its own, for chaos tests.

A chaos test kills and restarts processes, sometimes Redis itself, and often runs on a broker of
its own (a fresh RabbitMQ vhost, a private redis-server): it cannot share the session's worker.
:class:`Stack` starts workers, listeners, relays and audit consumers with ``PROVISIONER_*``
overrides, kills them (SIGKILL, the whole process group) and restarts them under the same name.
The database stays the session's, so the test reads the outcome with the session's engine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery

from tests.support.api import EnvServiceProcess
from tests.support.environment import rabbitmq_vhost_url

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
READY = {
    "worker": "ready.",
    "listen": "listener.started",
    "relay": "relay.started",
    "consume": "audit.started",
}


def rabbitmq_available() -> bool:
    if shutil.which("rabbitmqctl") is None:
        return False
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


def fresh_rabbitmq_broker() -> str:
    base = os.environ.get("TEST_BROKER_URL", "")
    return rabbitmq_vhost_url(base if base.startswith("amqp") else RABBITMQ_URL)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Stack:
    def __init__(self, log_dir: Path, env: dict[str, str | None], tag: str) -> None:
        self.log_dir = log_dir
        self.env = env
        self.tag = tag
        self.processes: dict[str, EnvServiceProcess] = {}
        self.generation: dict[str, int] = {}
        self._probe: Celery | None = None

    @property
    def broker_url(self) -> str:
        url = self.env.get("PROVISIONER_BROKER_URL") or os.environ["PROVISIONER_BROKER_URL"]
        return url

    # --- processes ---
    def start(self, name: str, args: list[str], *, wait: bool = True) -> EnvServiceProcess:
        """Start (or restart) ``name``; a restart gets a log of its own, so that its readiness
        marker is not the previous run's."""
        self.generation[name] = self.generation.get(name, 0) + 1
        log_name = f"{self.tag}-{name}-{self.generation[name]}"
        process = EnvServiceProcess(log_name, args, self.log_dir, self.env).start()
        self.processes[name] = process
        if wait:
            process.wait_ready(READY[args[0]], timeout=90)
        return process

    def wait_ready(self, *names: str) -> None:
        """Await processes started with ``wait=False``: started together, then awaited, their
        start-ups (mostly imports) overlap instead of adding up."""
        for name in names:
            process = self.processes[name]
            process.wait_ready(READY[process.args[0]], timeout=90)

    def worker(self, name: str, concurrency: int = 2, *, wait: bool = True) -> EnvServiceProcess:
        return self.start(
            name,
            ["worker", "--concurrency", str(concurrency), "--hostname", self.node(name)],
            wait=wait,
        )

    def node(self, name: str) -> str:
        return f"{self.tag}-{name}@chaos"

    def kill(self, name: str) -> None:
        """SIGKILL the process and everything it started (a worker's pool too)."""
        process = self.processes[name]
        assert process.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.process.wait(15)

    def alive(self, name: str) -> bool:
        process = self.processes[name].process
        return process is not None and process.poll() is None

    def stop_all(self) -> None:
        # SIGTERM to all first: the shutdowns overlap.
        for process in self.processes.values():
            try:
                process.terminate()
            except Exception:  # noqa: S112 (best effort at teardown)
                continue
        for process in self.processes.values():
            try:
                process.stop(timeout=15)
            except Exception:  # noqa: S112 (best effort at teardown)
                continue
        if self._probe is not None:
            self._probe.close()

    # --- what the workers are doing (Celery remote control) ---
    def active(self, names: list[str], timeout: float = 1.0) -> dict[str, list[dict[str, Any]]]:
        """The tasks each named worker is running now, with the pool process running each."""
        if self._probe is None:
            self._probe = Celery("chaos-probe", broker=self.broker_url)
        nodes = {self.node(name): name for name in names}
        replies = self._probe.control.inspect(
            destination=list(nodes), timeout=timeout, limit=len(nodes)
        ).active()
        return {nodes[node]: tasks for node, tasks in (replies or {}).items() if node in nodes}
