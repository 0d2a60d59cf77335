"""The bench's own service processes, and their clean-up on every way out.

Each process starts in a session of its own (stopped with its whole group), and asks the kernel
to send it SIGTERM if the bench dies first (``PR_SET_PDEATHSIG``), so that even a bench killed
with SIGKILL leaves no worker behind: a Celery worker's SIGTERM stops its pool too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

PYTHON = sys.executable
PR_SET_PDEATHSIG = 1
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0


def _die_with_parent() -> None:  # pragma: no cover (runs in the child, before exec)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class BenchProcess:
    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BenchProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [PYTHON, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, marker: str, timeout: float = READY_TIMEOUT_S) -> BenchProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log_text():
                return self
            if not self.alive():
                break
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start; its log:\n{self.log_text()[-3000:]}")

    def tree(self) -> list[psutil.Process]:
        """The process and its children (a Celery worker's pool)."""
        try:
            main = psutil.Process(self.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.tree():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.tree():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        leftovers = self.tree()[1:]
        try:
            os.killpg(self.pid, signal.SIGCONT)  # a paused process cannot stop
            os.killpg(self.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        for child in leftovers:  # a pool child that outlived its parent
            try:
                child.kill()
            except psutil.NoSuchProcess:
                continue


class ProcessGroup:
    """Every process the bench started; :meth:`stop_all` is idempotent."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.processes: list[BenchProcess] = []

    def start(self, name: str, args: list[str], marker: str) -> BenchProcess:
        process = BenchProcess(name, args, self.log_dir, self.env)
        self.processes.append(process)
        return process.start().wait_ready(marker)

    def stop_all(self) -> None:
        while self.processes:
            self.processes.pop().stop()


def celery_worker_args(app: str, queue: str, name: str, concurrency: int) -> list[str]:
    """The flags ``provisioner worker`` passes Celery (service/cli.py), for both workers."""
    return [
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "-Q",
        queue,
        "-n",
        name,
        "--loglevel",
        "INFO",
        "-O",
        "fair",
        "--without-gossip",
        "--without-mingle",
    ]
