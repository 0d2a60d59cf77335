"""Real service processes for the tests: a Celery worker, the listener, the relay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

PYTHON = sys.executable


class ServiceProcess:
    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
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

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait()


def start_worker(
    log_dir: Path, name: str = "worker", concurrency: int = 3, extra: list[str] | None = None
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
    worker.wait_ready("ready.")
    return worker


def start_listener(log_dir: Path, name: str = "listener") -> ServiceProcess:
    listener = ServiceProcess(name, ["listen"], log_dir).start()
    listener.wait_ready("listener.started")
    return listener


def start_relay(log_dir: Path, name: str = "relay") -> ServiceProcess:
    relay = ServiceProcess(name, ["relay"], log_dir).start()
    relay.wait_ready("relay.started")
    return relay
