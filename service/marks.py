"""Marking published outbox rows, in batches, off the path of whoever published them.

A mark is one write transaction: on SQLite it waits for the single write lock behind every other
process's step. Publishing a step's events and marking them in the same breath cost a write
transaction per step; here a per-process thread marks whatever was published in the last
``OUTBOX_MARK_DELAY_S`` with one ``UPDATE``. A row published but not yet marked is at worst
published again by the relay loop (publish-then-mark already allows that), and only if this
process dies within the delay; ``flush`` marks what is pending at once (at exit, in tests).
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable, Iterable

import structlog

from config.keys import OUTBOX_MARK_BATCH, OUTBOX_MARK_DELAY_S

log = structlog.get_logger(__name__)

MarkRows = Callable[[list[int]], None]
# How long an exiting process waits for a batch being marked (never forever: a database that
# does not answer must not keep a process from exiting; the relay loop covers the rest).
MARK_JOIN_S = 5.0


class BatchedMarks:
    def __init__(
        self,
        mark: MarkRows,
        *,
        delay_s: float = OUTBOX_MARK_DELAY_S,
        batch: int = OUTBOX_MARK_BATCH,
    ) -> None:
        self._mark = mark
        self._delay_s = delay_s
        self._batch = batch
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[int] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        atexit.register(self.stop)
        # A forked child (a prefork worker's pool) starts with nothing pending and no thread:
        # the parent marks what it published.
        os.register_at_fork(after_in_child=self._forget_after_fork)

    def add(self, ids: Iterable[int]) -> None:
        with self._lock:
            was_idle = not self._pending
            self._pending.extend(ids)
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="outbox-marks", daemon=True)
                self._thread.start()
            # Wake the thread when it waits for a first row, or when the batch is full; not
            # while it waits for more rows to join a batch.
            if was_idle or len(self._pending) >= self._batch:
                self._wake.notify()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self) -> None:
        """Mark everything published so far, now, in the caller's thread."""
        with self._lock:
            ids, self._pending = self._pending, []
        self._mark_logged(ids)

    def stop(self) -> None:
        """At exit: let a batch being marked finish, then mark the rest (the thread starts again
        on the next ``add``)."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=MARK_JOIN_S)
        self.flush()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                # Let the rows of the next moments join this batch, unless it is full already.
                if len(self._pending) < self._batch:
                    self._wake.wait(self._delay_s)
                ids, self._pending = self._pending, []
            self._mark_logged(ids)

    def _mark_logged(self, ids: list[int]) -> None:
        if not ids:
            return
        try:
            self._mark(ids)
        except Exception as exc:
            # The relay loop publishes them again after its grace; consumers dedup on the id.
            log.warning("outbox.mark_failed", error=str(exc)[:300], events=len(ids))

    def _forget_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending = []
        self._thread = None
        self._stopping = False
