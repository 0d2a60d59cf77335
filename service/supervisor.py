"""``provisioner up``: one supervised process group.

A child that dies is restarted; one that keeps dying (``MAX_RESTARTS`` within
``RESTART_WINDOW_S``) takes the group down with a clear log line, because a service that runs
without its worker or listener only looks alive. SIGTERM/SIGINT stop every child cleanly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from types import FrameType

import structlog

log = structlog.get_logger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 20.0


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: deque[float] = field(default_factory=deque)

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv)
        log.info("supervisor.child_started", child=self.name, pid=self.process.pid)


def provisioner_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "service", *args]


class Supervisor:
    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self._stopping = False

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("supervisor.stopping", signal=signal.Signals(signum).name)
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for child in self.children:
            child.start()
        exit_code = 0
        while not self._stopping:
            time.sleep(0.5)
            for child in self.children:
                assert child.process is not None
                code = child.process.poll()
                if code is None or self._stopping:
                    continue
                now = time.monotonic()
                while child.restarts and now - child.restarts[0] > RESTART_WINDOW_S:
                    child.restarts.popleft()
                if len(child.restarts) >= MAX_RESTARTS:
                    log.error(
                        "supervisor.giving_up",
                        child=child.name,
                        exit_code=code,
                        message=f"{child.name} exited {MAX_RESTARTS} times within "
                        f"{RESTART_WINDOW_S:.0f}s; stopping the whole group (see its log above)",
                    )
                    self._stopping = True
                    exit_code = 1
                    break
                child.restarts.append(now)
                log.warning("supervisor.restarting", child=child.name, exit_code=code)
                child.start()
        self._stop_all()
        return exit_code

    def _stop_all(self) -> None:
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("supervisor.killing", child=child.name)
                child.process.kill()
                child.process.wait()
        log.info("supervisor.stopped")
