"""Several Celery worker processes consuming the saga queue, as one fixture value.

``TEST_WORKERS=N`` starts N workers, each under its own node name (``worker-1-…@host``,
``worker-2-…@host``): what several hosts look like to the broker. The group answers the calls
the tests make on a single worker (``children()`` for the SIGKILL test, ``log_text()``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import psutil

from tests.support.processes import WORKER_READY, ServiceProcess, start_worker, stop_together


def worker_count() -> int:
    raw = os.environ.get("TEST_WORKERS", "1").strip() or "1"
    count = int(raw)
    if count < 1:
        raise ValueError(f"TEST_WORKERS must be at least 1, got {raw!r}")
    return count


class WorkerGroup:
    def __init__(self, workers: Iterable[ServiceProcess]) -> None:
        self.workers = list(workers)

    @property
    def node_names(self) -> list[str]:
        return [w.args[w.args.index("--hostname") + 1] for w in self.workers]

    def children(self) -> list[psutil.Process]:
        """The pool processes of every worker."""
        return [child for w in self.workers for child in w.children()]

    def log_text(self) -> str:
        return "".join(w.log_text() for w in self.workers)

    def stop(self) -> None:
        stop_together(self.workers)


def start_workers(log_dir: Path, count: int, concurrency: int) -> WorkerGroup:
    """``count`` workers; with more than one, each gets ``concurrency`` split among them (at
    least 2 each), so that the machine runs about as many pool processes either way."""
    if count == 1:
        return WorkerGroup([start_worker(log_dir, concurrency=concurrency)])
    each = max(2, concurrency // count)
    workers: list[ServiceProcess] = []
    try:
        # All started, then all awaited: their start-ups overlap.
        for number in range(1, count + 1):
            workers.append(
                start_worker(log_dir, name=f"worker-{number}", concurrency=each, wait=False)
            )
        for worker in workers:
            worker.wait_ready(WORKER_READY)
    except BaseException:
        WorkerGroup(workers).stop()
        raise
    return WorkerGroup(workers)
