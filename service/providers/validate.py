"""validate: the tenant's request is well formed, before anything is made for it."""

from __future__ import annotations

import re

from sagas.errors import ValidationFailure
from sagas.steps import PLANS, SLUG_PATTERN
from service.providers.base import Output, StepContext

_SLUG = re.compile(SLUG_PATTERN)


def validation_problem(slug: object, plan: object) -> str | None:
    """What is wrong with the slug or plan, or None when both are valid."""
    # fullmatch, not match: ``$`` alone would accept a trailing newline.
    if not isinstance(slug, str) or not _SLUG.fullmatch(slug):
        return (
            f"slug {slug!r} is invalid: use 3 to 63 characters, lowercase letters, digits "
            f"and '-', starting with a letter (pattern {SLUG_PATTERN})"
        )
    if not isinstance(plan, str) or plan not in PLANS:
        return f"plan {plan!r} is unknown: choose one of {', '.join(sorted(PLANS))}"
    return None


class ValidateProvider:
    step: str = "validate"

    def run(self, ctx: StepContext) -> Output:
        problem = validation_problem(ctx.slug, ctx.plan)
        if problem is not None:
            raise ValidationFailure(problem)
        return {"slug": ctx.slug, "plan": ctx.plan}

    def exists(self, ctx: StepContext, output: Output) -> bool:
        slug = output.get("slug", ctx.slug)
        plan = output.get("plan", ctx.plan)
        return (slug, plan) == (ctx.slug, ctx.plan) and validation_problem(slug, plan) is None

    def compensate(self, ctx: StepContext, output: Output) -> None:
        """Validation makes nothing, so there is nothing to undo."""
