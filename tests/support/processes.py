"""Real service processes for the tests: a Celery worker, the listener, the relay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

PYTHON = sys.executable
WORKER_READY = "ready."


def logged(log_text: str, event: str, slug: str) -> bool:
    """Whether a line of ``log_text`` records ``event`` for the tenant ``slug``."""
    return any(event in line and slug in line for line in log_text.splitlines())


class ServiceProcess:
    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._terminated = False

    def start(self) -> ServiceProcess:
        self._terminated = False
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [PYTHON, "-m", "service", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait_ready(self, marker: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path.exists() and marker in self.log_path.read_text(errors="replace"):
                return
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready; log:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self) -> None:
        """SIGTERM to its process group, once, without waiting for it to end."""
        if self._terminated or self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.pid, signal.SIGTERM)
        self._terminated = True

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # No second SIGTERM if stop_together sent one: each is a new shutdown request to the
        # process (a Celery worker runs its shutdown handler again).
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait()


def stop_together(processes: Iterable[ServiceProcess], timeout: float = 20.0) -> None:
    """Stop several processes: SIGTERM to all, then wait for each (SIGKILL past ``timeout``), so
    that their shutdowns overlap instead of adding up."""
    stopping = list(processes)
    for process in stopping:
        process.terminate()
    for process in stopping:
        process.stop(timeout)


def start_worker(
    log_dir: Path,
    name: str = "worker",
    concurrency: int = 3,
    extra: list[str] | None = None,
    *,
    wait: bool = True,
) -> ServiceProcess:
    worker = ServiceProcess(
        name,
        [
            "worker",
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}-{os.getpid()}@%h",
            *(extra or []),
        ],
        log_dir,
    ).start()
    if wait:
        worker.wait_ready(WORKER_READY)
    return worker


def start_listener(log_dir: Path, name: str = "listener") -> ServiceProcess:
    return start_listeners(log_dir, [name])[0]


def start_listeners(log_dir: Path, names: Iterable[str]) -> list[ServiceProcess]:
    """Listeners started together, then awaited: their start-ups (mostly imports) overlap."""
    listeners = [ServiceProcess(name, ["listen"], log_dir).start() for name in names]
    try:
        for listener in listeners:
            listener.wait_ready("listener.started")
    except BaseException:
        stop_together(listeners)
        raise
    return listeners


def start_relay(log_dir: Path, name: str = "relay") -> ServiceProcess:
    relay = ServiceProcess(name, ["relay"], log_dir).start()
    relay.wait_ready("relay.started")
    return relay
