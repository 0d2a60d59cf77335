"""The saga's own work without Celery, in one process: ``python -m bench.profile --in-process``.

It creates sagas with ``handlers.create`` and runs each step's body with ``SagaRunner.run_step``
in turn, on the service's engine, Redis and publisher and the no-op providers, with no worker and
no chain (the dispatcher only records the chain it is asked to send). It reports the thread CPU
of a creation and of a step's body.

On a noisy machine the full bench's ratios move by a tenth between runs, and the by-process view
by more (docs/benchmarks.md, round 7); this measure moves by a few percent. To compare two trees,
run it in each in turn, a few times: ``PYTHONPATH=<tree> python -m bench.profile --in-process``.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass, field

from sagas.messages import CommandType
from service.bootstrap import Container
from service.dispatch import AttemptRef, DecommissionRef, StepTenant
from service.handlers import Request


@dataclass
class RecordedChains:
    """A dispatcher that sends nothing: the chains the handlers asked for, to run by hand."""

    attempts: list[tuple[AttemptRef, list[str], StepTenant]] = field(default_factory=list)

    def start_attempt(self, ref: AttemptRef, steps: list[str], tenant: StepTenant) -> None:
        self.attempts.append((ref, steps, tenant))

    def start_decommission(self, ref: DecommissionRef, compensations: list[str]) -> None:
        raise NotImplementedError("the in-process measure provisions only")


@dataclass(frozen=True)
class Measured:
    creation_cpu_ms: float  # a creation's thread CPU, the median over the sagas
    step_cpu_ms: float  # a step body's thread CPU, the median over every step run
    step_wall_ms: float  # its wall time, the median
    sagas: int
    steps: int


def measure(services: Container, chains: RecordedChains, sagas: int, warmup: int) -> Measured:
    """Create and run ``warmup`` sagas unmeasured, then ``sagas`` measured."""
    for _ in range(warmup):
        _one(services, chains, [], [], [])
    creations: list[float] = []
    steps_cpu: list[float] = []
    steps_wall: list[float] = []
    for _ in range(sagas):
        _one(services, chains, creations, steps_cpu, steps_wall)
    services.relay.flush_marks()
    return Measured(
        creation_cpu_ms=statistics.median(creations) * 1000,
        step_cpu_ms=statistics.median(steps_cpu) * 1000,
        step_wall_ms=statistics.median(steps_wall) * 1000,
        sagas=sagas,
        steps=len(steps_cpu),
    )


def _one(
    services: Container,
    chains: RecordedChains,
    creations: list[float],
    steps_cpu: list[float],
    steps_wall: list[float],
) -> None:
    slug = f"inproc-{uuid.uuid4().hex[:12]}"
    began = time.thread_time()
    outcome = services.handlers.create(
        Request(CommandType.PROVISION, slug, requested_by="bench"), plan="pro"
    )
    creations.append(time.thread_time() - began)
    if not outcome.accepted:
        raise RuntimeError(f"create {slug} was rejected: {outcome.message}")
    ref, steps, tenant = chains.attempts.pop()
    for step in steps:
        began, wall = time.thread_time(), time.perf_counter()
        # As the step task calls it on a message's first delivery.
        services.runner.run_step(ref, step, first_delivery=True, tenant=tenant)
        steps_cpu.append(time.thread_time() - began)
        steps_wall.append(time.perf_counter() - wall)
