"""The lease thread and fork: a worker forks pool processes while the thread runs, and a child
must never inherit a lock the thread held mid-round (it would wait on it for ever)."""

from __future__ import annotations

import os
import threading
from typing import cast

from service.worker_leases import LeaseKeeper, WorkerLeases


class SlowLeases:
    """A round that blocks until the test lets it finish."""

    def __init__(self) -> None:
        self.in_round = threading.Event()
        self.finish = threading.Event()

    def register(self, incarnation: str) -> None:
        pass

    def renew(self, incarnation: str) -> bool:
        self.in_round.set()
        self.finish.wait(10)
        return True

    def sweep(self, *, own: str | None = None) -> dict[str, int]:
        return {}


def test_a_fork_waits_for_the_round_in_progress() -> None:
    leases = SlowLeases()
    keeper = LeaseKeeper(cast(WorkerLeases, leases), "unit~1~x", every_s=60)
    keeper.start()
    assert leases.in_round.wait(10)
    threading.Timer(0.3, leases.finish.set).start()

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    # The fork could only happen once the round was over.
    assert leases.finish.is_set()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    keeper.stop()
