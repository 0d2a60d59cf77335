"""CPU time of a worker's pool processes by phase of a step, on each process's thread clock.

``bench.profile --cpu`` (cProfile) charges its own cost to every Python call, so call-heavy code
looks far dearer than it is: it put Celery's ``saferepr`` of a message's arguments at a tenth of
the pool's CPU, where timing it alone gave 28 µs a step (docs/benchmarks.md, round 10). Here a
handful of methods are wrapped with two ``time.thread_time()`` reads each, and a task's whole
run is read from ``task_prerun`` to ``task_postrun``: the figures are the process's own CPU, a
microsecond or so of overhead each, and phases nest (a step's body holds its completion). Two
rows stand beside them: the whole pool process (all its threads, between tasks too: billiard's
hand-over, the outbox marks' thread) and Python's cyclic garbage collector, wherever it ran.

``install_if_asked()`` runs in a worker's app module: with ``BENCH_PHASES_DIR`` set, each pool
process wraps the phases when it starts and writes ``<name>-<pid>.json`` there when it stops (a
warm shutdown). ``summary()`` reads them back as CPU per step.
"""

from __future__ import annotations

import functools
import gc
import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.signals import task_postrun, task_prerun, worker_process_init, worker_process_shutdown

PHASES_ENV = "BENCH_PHASES_DIR"
# "wall": time the phases on the wall clock instead (one chain at a time: what a step's latency
# is made of, waits on Redis and SQLite included).
PHASES_CLOCK_ENV = "BENCH_PHASES_CLOCK"
TASK_PHASE = "the task, prerun to postrun"
# Beside the phases: the whole pool process (every thread, between tasks too), and the cyclic
# garbage collector wherever it ran (in a phase or not).
PROCESS_PHASE = "the pool process, all of it"
GC_PHASE = "Python's garbage collector"

# (label, module, class, method): nested phases are indented as they nest in a saga step.
PHASES: tuple[tuple[str, str, str, str], ...] = (
    ("  the step's body", "service.saga_runner", "SagaRunner", "run_step"),
    ("    lock + fault plan (Redis)", "service.preflight", "StepPreflight", "confirm"),
    ("    completion transaction", "service.step_completion", "StepCompletion", "complete"),
    ("    building and holding its events", "service.relay", "OutboxRelay", "publish_now"),
    ("  the floor's commit and events", "bench.floor", "FloorWork", "step"),
    ("  sending the next step (Celery)", "celery.app.task", "Task", "apply_async"),
    (
        "    one script: events + message",
        "service.routed_publish",
        "RoutedPublish",
        "push_together",
    ),
    ("    its task-sent event (Celery)", "celery.events.dispatcher", "EventDispatcher", "publish"),
    # Not in the task: the outbox marks' own thread (service/marks.py).
    ("marking outbox rows published", "service.relay", "OutboxRelay", "_mark"),
)

LABELS = (PROCESS_PHASE, TASK_PHASE, *(label for label, *_ in PHASES), GC_PHASE)

_spent: dict[str, list[float]] = {}
_task_began: list[float] = []
_gc_began: list[float] = []
_process_began: float | None = None
_name = "worker"
_clock: Callable[[], float] = time.thread_time


def _add(label: str, seconds: float) -> None:
    totals = _spent.setdefault(label, [0.0, 0])
    totals[0] += seconds
    totals[1] += 1


def _timed(label: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def timed(*args: Any, **kwargs: Any) -> Any:
        began = _clock()
        try:
            return method(*args, **kwargs)
        finally:
            _add(label, _clock() - began)

    return timed


def _time_gc(phase: str, _info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_began.append(_clock())
    elif _gc_began:
        _add(GC_PHASE, _clock() - _gc_began.pop())


def _wrap_phases(**_: Any) -> None:
    global _process_began
    _process_began = time.process_time()
    gc.callbacks.append(_time_gc)
    for label, module_name, class_name, method_name in PHASES:
        try:
            owner = getattr(importlib.import_module(module_name), class_name)
            method = getattr(owner, method_name)
        except (ImportError, AttributeError):
            continue  # a phase of the other worker's code (the bare worker has no saga runner)
        setattr(owner, method_name, _timed(label, method))


def _task_started(**_: Any) -> None:
    _task_began.append(_clock())


def _task_ended(**_: Any) -> None:
    if _task_began:
        _add(TASK_PHASE, _clock() - _task_began.pop())


def _write(**_: Any) -> None:
    if _process_began is not None and _clock is time.thread_time:  # CPU, not wall time
        tasks = int(_spent.get(TASK_PHASE, [0.0, 0])[1])
        _spent[PROCESS_PHASE] = [time.process_time() - _process_began, tasks]
    path = Path(os.environ[PHASES_ENV]) / f"{_name}-{os.getpid()}.json"
    path.write_text(json.dumps(_spent))


def install_if_asked(name: str) -> None:
    """Time this worker's pool processes by phase if asked; ``name`` prefixes their files."""
    global _name, _clock
    if not os.environ.get(PHASES_ENV):
        return
    _name = name
    _clock = time.perf_counter if os.environ.get(PHASES_CLOCK_ENV) == "wall" else time.thread_time
    worker_process_init.connect(_wrap_phases, weak=False)
    task_prerun.connect(_task_started, weak=False)
    task_postrun.connect(_task_ended, weak=False)
    worker_process_shutdown.connect(_write, weak=False)


def summary(directory: Path, name: str) -> list[tuple[str, float, float]]:
    """(label, CPU ms per step, calls per step) of worker ``name``'s processes, in ``LABELS``
    order; a step is a task run."""
    totals: dict[str, list[float]] = {}
    for path in directory.glob(f"{name}-*.json"):
        for label, (seconds, calls) in json.loads(path.read_text()).items():
            total = totals.setdefault(label, [0.0, 0.0])
            total[0] += seconds
            total[1] += calls
    steps = totals.get(TASK_PHASE, [0.0, 0.0])[1]
    if not steps:
        return []
    return [
        (label, totals[label][0] / steps * 1000, totals[label][1] / steps)
        for label in LABELS
        if label in totals
    ]
