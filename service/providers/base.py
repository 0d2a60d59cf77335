"""What every provider offers the saga: do the work, say whether it still exists, undo it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Output = dict[str, Any]


@dataclass(frozen=True, slots=True)
class StepContext:
    """One parameter per provider call, so signatures can grow without breaking providers."""

    tenant_id: str
    slug: str
    plan: str
    admin_email: str | None
    attempt_number: int
    data_dir: Path
    console_url: str  # the admin console link of this tenant (settings' template, filled in)
    # What earlier steps of this tenant made (latest output per step), for check_readiness.
    outputs: Mapping[str, Output] = field(default_factory=dict)


class Provider(Protocol):
    step: str

    def run(self, ctx: StepContext) -> Output:
        """Do the step's work, idempotently (a redelivered step may run it twice); return the
        ids of what it made. Raise a ``sagas.errors.StepError`` subclass on failure."""

    def exists(self, ctx: StepContext, output: Output) -> bool:
        """Whether what ``run`` made (described by ``output``) is still there, intact."""

    def compensate(self, ctx: StepContext, output: Output) -> None:
        """Undo ``run``; succeed when there is nothing left to undo."""
