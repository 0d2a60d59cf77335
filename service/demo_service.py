"""The service ``provisioner demo`` tells its story against: a running one, or its own.

A running service is one whose Celery worker answers a ping on the broker (``celery inspect
ping``, run as a command: the Celery app lives in ``tasks``, which ``service`` does not import).
Otherwise the demo runs ``provisioner up`` itself, with a short step backoff, and stops it at
the end; ``up`` brings its own embedded Redis when none answers on this machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from config.settings import Settings
from service import embedded_redis

PING_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
# What a demo's own service uses: a failing step is retried after 0.2 s, 0.4 s, ...
OWN_STEP_BACKOFF_S = "0.2"
_WORKER_READY = re.compile(r"@\S+ ready\.")


class DemoServiceError(RuntimeError):
    """The demo's own service did not come up; ``str()`` says why and where the log is."""


def worker_answers(settings: Settings) -> bool:
    """Whether a Celery worker of this broker answers a ping."""
    if embedded_redis.missing([settings.redis_url, settings.broker_url]):
        return False  # a local Redis the service needs is not even there
    argv = [sys.executable, "-m", "celery", "-A", "tasks.app", "inspect", "ping"]
    try:
        probe = subprocess.run(
            [*argv, "--timeout", str(PING_TIMEOUT_S)],
            capture_output=True,
            timeout=PING_TIMEOUT_S + 30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0 and b"pong" in probe.stdout


class OwnService:
    """``provisioner up`` as a child process, its output in a log file."""

    def __init__(self, concurrency: int = 2) -> None:
        self.concurrency = concurrency
        self.log_path = Path(tempfile.mkstemp(prefix="provisioner-demo-up-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PROVISIONER_STEP_BACKOFF_S": OWN_STEP_BACKOFF_S}
        argv = [sys.executable, "-m", "service", "up", "--concurrency", str(self.concurrency)]
        with self.log_path.open("ab") as log:
            # A session of its own: the demo stops it, in order, however the demo ends.
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if _WORKER_READY.search(self.log_text()):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        tail = "\n".join(self.log_text().strip().splitlines()[-15:])
        self.stop()
        raise DemoServiceError(f"`provisioner up` did not get ready (log {self.log_path}):\n{tail}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode
