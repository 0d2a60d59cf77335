"""Published outbox rows are marked in batches, off the publisher's path, and none is left
unmarked when the process exits normally (service/marks.py). In memory: a fake ``mark``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from service.marks import BatchedMarks


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.called = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, ids: list[int]) -> None:
        with self._lock:
            self.batches.append(list(ids))
        self.called.set()

    def marked(self) -> list[int]:
        with self._lock:
            return [i for batch in self.batches for i in batch]


def test_rows_published_together_are_marked_in_one_batch_by_the_thread() -> None:
    recorder = Recorder()
    # A long delay: the rows added meanwhile join the first batch.
    marks = BatchedMarks(recorder, delay_s=60.0, batch=4)
    marks.add([1, 2])
    marks.add([3, 4])  # the batch is full: marked without waiting out the delay
    assert recorder.called.wait(30)
    assert recorder.batches == [[1, 2, 3, 4]]
    assert marks.pending() == 0
    marks.stop()


def test_the_thread_marks_again_after_it_went_idle() -> None:
    recorder = Recorder()
    marks = BatchedMarks(recorder, delay_s=0.0, batch=100)
    marks.add([1])
    assert recorder.called.wait(30)
    recorder.called.clear()
    marks.add([2])
    assert recorder.called.wait(30)
    assert recorder.marked() == [1, 2]
    marks.stop()


def test_stop_marks_what_is_pending_at_once() -> None:
    recorder = Recorder()
    marks = BatchedMarks(recorder, delay_s=60.0, batch=100)
    marks.add([7, 8, 9])
    marks.stop()
    assert sorted(recorder.marked()) == [7, 8, 9]
    assert marks.pending() == 0


def test_a_failed_mark_is_logged_not_raised_and_the_next_batch_goes_on() -> None:
    calls: list[list[int]] = []
    done = threading.Event()

    def flaky(ids: list[int]) -> None:
        calls.append(list(ids))
        if len(calls) == 1:
            raise RuntimeError("database is locked")
        done.set()

    marks = BatchedMarks(flaky, delay_s=0.0, batch=100)
    marks.add([1])
    marks.add([2])
    marks.stop()
    marks.add([3])
    assert done.wait(30)
    marks.stop()
    assert [i for batch in calls for i in batch][-1] == 3


def test_a_process_that_exits_normally_marks_what_it_published(tmp_path: Path) -> None:
    out = tmp_path / "marked.txt"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from service.marks import BatchedMarks

        def mark(ids):
            with Path({str(out)!r}).open("a") as f:
                f.write(" ".join(map(str, ids)) + "\\n")

        marks = BatchedMarks(mark, delay_s=3600.0, batch=1000)
        marks.add([11, 12])
        marks.add([13])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=60)
    marked = sorted(int(i) for i in out.read_text().split())
    assert marked == [11, 12, 13]
