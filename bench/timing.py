"""Step timestamps from inside the workers, the same way for the saga and the bare chain.

Each worker process appends ``key index phase unix_time`` lines (``pre`` from Celery's
``task_prerun``, ``post`` from ``task_postrun``) to a file of its own under
``$BENCH_TIMING_DIR``; the bench reads them back with :class:`TimingLog`. A line costs one
``write`` in the worker, identical for both kinds of chain.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from celery.signals import task_postrun, task_prerun

from sagas.steps import STEPS

TIMING_DIR_ENV = "BENCH_TIMING_DIR"
STEP_TASK_PREFIX = "provisioner.step."
BARE_TASK = "bench.noop"
FLOOR_TASK = "bench.floor"
CHAIN_LENGTH = len(STEPS)

_STEP_INDEX = {step: i for i, step in enumerate(STEPS)}
_files: dict[int, IO[str]] = {}


def saga_key(slug: str, attempt_number: int) -> str:
    return f"{slug}#{attempt_number}"


def _key_and_index(task_name: str, kwargs: dict[str, Any]) -> tuple[str, int] | None:
    if task_name.startswith(STEP_TASK_PREFIX):
        step = task_name[len(STEP_TASK_PREFIX) :]
        return saga_key(kwargs["slug"], kwargs["attempt_number"]), _STEP_INDEX[step]
    if task_name in (BARE_TASK, FLOOR_TASK):
        return str(kwargs["run_id"]), int(kwargs["index"])
    return None


def _record(phase: str, task: Any, kwargs: dict[str, Any] | None) -> None:
    now = time.time()
    directory = os.environ.get(TIMING_DIR_ENV)
    if not directory or task is None:
        return
    found = _key_and_index(getattr(task, "name", "") or "", kwargs or {})
    if found is None:
        return
    pid = os.getpid()
    out = _files.get(pid)
    if out is None:  # opened after the fork, one file per pool process
        out = _files[pid] = open(  # noqa: SIM115 (kept open for the process's life)
            Path(directory) / f"{pid}.log", "a", buffering=1, encoding="ascii"
        )
    out.write(f"{found[0]} {found[1]} {phase} {now:.6f}\n")


def _on_prerun(task: Any = None, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    _record("pre", task, kwargs)


def _on_postrun(task: Any = None, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    _record("post", task, kwargs)


def connect() -> None:
    """Record every step task of this worker (call at import of the worker's app module)."""
    task_prerun.connect(_on_prerun, weak=False)
    task_postrun.connect(_on_postrun, weak=False)


@dataclass
class ChainTimes:
    pre: dict[int, float] = field(default_factory=dict)
    post: dict[int, float] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return CHAIN_LENGTH - 1 in self.post


class TimingLog:
    """Reads the workers' timing files incrementally; the first record of a step wins (a
    redelivered step does not move its timestamps).

    The bench polls every few milliseconds on the same cores as the system it measures, so a poll
    must cost next to nothing: each file stays open and is read from where the last read ended
    (opening and closing every file on every poll took a tenth of a core, docs/benchmarks.md,
    round 5)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._handles: dict[str, IO[str]] = {}
        self._partial: dict[str, str] = {}
        self.chains: dict[str, ChainTimes] = {}

    def poll(self) -> None:
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.endswith(".log") and entry.name not in self._handles:
                    self._handles[entry.name] = open(  # noqa: SIM115 (closed by close())
                        entry.path, encoding="ascii"
                    )
        for name, handle in self._handles.items():
            chunk = handle.read()
            if not chunk:
                continue
            text = self._partial.pop(name, "") + chunk
            lines = text.split("\n")
            if lines[-1]:
                self._partial[name] = lines[-1]
            for line in lines[:-1]:
                self._add(line)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def _add(self, line: str) -> None:
        key, index, phase, stamp = line.split(" ")
        times = self.chains.setdefault(key, ChainTimes())
        target = times.pre if phase == "pre" else times.post
        target.setdefault(int(index), float(stamp))

    def done(self, key: str) -> bool:
        times = self.chains.get(key)
        return times is not None and times.done

    def times(self, key: str) -> ChainTimes:
        return self.chains[key]

    def keys(self) -> Iterator[str]:
        return iter(self.chains)
