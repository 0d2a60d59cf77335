"""The bare chain: eight no-op tasks on a Celery app with the service's own configuration
(``config/celery.py``), on a queue of its own so that its worker and the saga's never take each
other's messages. ``celery -A bench.bare_app worker -Q bench.bare``. The same worker runs the
floor's chain (``bench/floor.py``): the same tasks, plus one commit and two events each."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task, chain

from bench import cpu_profile, floor, phase_clock, timing
from config.celery import celery_config
from config.settings import get_settings
from tasks.steps import TASK_OPTIONS

BARE_QUEUE = "bench.bare"

app = Celery("bench-bare")
_config = celery_config(get_settings())
_config["task_default_queue"] = BARE_QUEUE
app.config_from_object(_config)


@app.task(name=timing.BARE_TASK, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def noop(self: Task, *, run_id: str, index: int) -> dict[str, Any]:
    # Returns what a saga step returns (the step and its output), so the messages match too.
    return {"step": index, "output": {}}


@app.task(name=timing.FLOOR_TASK, **TASK_OPTIONS)  # type: ignore[untyped-decorator]
def floor_step(self: Task, *, run_id: str, index: int) -> dict[str, Any]:
    floor.work().step(run_id, index)
    return {"step": index, "output": {}}


def send_bare_chain(run_id: str) -> None:
    chain(*(noop.si(run_id=run_id, index=i) for i in range(timing.CHAIN_LENGTH))).apply_async()


def send_floor_chain(run_id: str) -> None:
    chain(
        *(floor_step.si(run_id=run_id, index=i) for i in range(timing.CHAIN_LENGTH))
    ).apply_async()


timing.connect()
cpu_profile.install_if_asked("bare")
phase_clock.install_if_asked("bare")
