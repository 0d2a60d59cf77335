"""Where a retry resumes: the longest prefix of steps whose work still verifiably exists."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sagas.steps import STEPS

Output = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Made:
    """What a step made in some earlier attempt, and which attempt made it."""

    output: Output
    attempt_number: int


@dataclass(frozen=True, slots=True)
class ResumePlan:
    resumed_from: str
    reused: tuple[tuple[str, int], ...]  # (step, attempt that made it), in step order

    @property
    def reused_steps(self) -> list[str]:
        return [step for step, _ in self.reused]


def resume_point(made: Mapping[str, Made], exists: Callable[[str, Output], bool]) -> ResumePlan:
    """Reuse every step, in order, whose earlier output still exists; run from the first that
    does not. ``exists`` is asked only along the prefix, so a deleted early step stops the
    walk there even if later steps' work is still around (it was built on what is gone)."""
    reused: list[tuple[str, int]] = []
    for step in STEPS:
        earlier = made.get(step)
        if earlier is None or not exists(step, earlier.output):
            return ResumePlan(resumed_from=step, reused=tuple(reused))
        reused.append((step, earlier.attempt_number))
    # Everything still exists yet the attempt did not end active: run the final step again.
    return ResumePlan(resumed_from=STEPS[-1], reused=tuple(reused[:-1]))
