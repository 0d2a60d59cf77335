"""CPU time of a worker's pool processes, by function: cProfile on each pool process's own CPU
clock (``time.thread_time``), so that a process waiting for a core, a lock or a socket counts
nothing (py-spy's samples, ``bench.profile``'s default, count a runnable process that waits).

``install_if_asked()`` runs in the worker's app module: with ``BENCH_CPU_PROFILE_DIR`` set, each
pool process profiles itself from its start and writes ``<pid>.prof`` there when it stops (a warm
shutdown). ``summary()`` reads them back as milliseconds of CPU per step. cProfile's own cost
inflates every figure about threefold: read the shares, not the milliseconds. Only the pool
process's main thread is profiled (the outbox marks' thread is not).
"""

from __future__ import annotations

import cProfile
import os
import pstats
import time
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

CPU_PROFILE_ENV = "BENCH_CPU_PROFILE_DIR"

# (label, pstats key's function part, file suffix): the rows of docs/benchmarks.md, inclusive.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("the task, all of it (Celery's trace)", "trace_task", "celery/app/trace.py"),
    ("  the step (the task's body)", "run_step", "service/saga_runner.py"),
    ("    pick-up read (fence + row)", "_pick_up", "service/saga_runner.py"),
    ("    lock renewal + fault plan (Redis)", "run", "service/preflight.py"),
    ("    completion transaction", "complete", "service/step_completion.py"),
    ("    publishing the events", "publish_now", "service/relay.py"),
    ("  sending the next step (Celery)", "_dispatch_callbacks_and_chain", "celery/app/trace.py"),
    ("  task events (Celery)", "publish", "celery/events/dispatcher.py"),
    ("the floor's step (commit + two events)", "step", "bench/floor.py"),
)

_profile: cProfile.Profile | None = None
_name = "worker"


def _start(**_: Any) -> None:
    global _profile
    _profile = cProfile.Profile(time.thread_time)
    _profile.enable()


def _stop(**_: Any) -> None:
    if _profile is None:
        return
    _profile.disable()
    _profile.dump_stats(str(Path(os.environ[CPU_PROFILE_ENV]) / f"{_name}-{os.getpid()}.prof"))


def install_if_asked(name: str) -> None:
    """Profile this worker's pool processes if asked; ``name`` prefixes their files."""
    global _name
    if os.environ.get(CPU_PROFILE_ENV):
        _name = name
        worker_process_init.connect(_start, weak=False)
        worker_process_shutdown.connect(_stop, weak=False)


def summary(directory: Path, name: str, steps: int) -> list[tuple[str, float]]:
    """Inclusive CPU ms per step of each row found in the profiles of worker ``name``."""
    files = [str(path) for path in sorted(directory.glob(f"{name}-*.prof"))]
    if not files:
        raise RuntimeError(f"no profiles in {directory} (did the workers stop warm?)")
    stats: dict[Any, Any] = pstats.Stats(*files).stats  # type: ignore[attr-defined]
    found: list[tuple[str, float]] = []
    for label, function, suffix in ROWS:
        seconds = sum(
            cumulative
            for (filename, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.items()
            if name == function and filename.endswith(suffix)
        )
        if seconds:
            found.append((label, seconds * 1000 / steps))
    return found
