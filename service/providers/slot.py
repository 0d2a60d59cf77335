"""reserve_slot: the slug's one row in ``slots``, held by this tenant."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from sagas.errors import SlotTaken, TransientUpstreamError
from service.db.engine import unit_of_work
from service.db.models import Slot
from service.providers.base import Output, StepContext

# Insert, then look up the holder on conflict: if the holder releases the slot in between,
# try again, but only a few times before handing the step back to the saga's own retries.
_RESERVE_TRIES = 3


class SlotProvider:
    step: str = "reserve_slot"

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def run(self, ctx: StepContext) -> Output:
        for _ in range(_RESERVE_TRIES):
            # The insert is the check: the primary key settles a race between two tenants
            # (or two deliveries of this step) without a read-then-write window.
            if self._try_insert(ctx.slug, ctx.tenant_id):
                return {"slot": ctx.slug}
            holder = self._holder(ctx.slug)
            if holder == ctx.tenant_id:
                return {"slot": ctx.slug}
            if holder is not None:
                raise SlotTaken(f"slug {ctx.slug!r} is already reserved by tenant {holder}")
        raise TransientUpstreamError(f"the slot of slug {ctx.slug!r} kept changing hands")

    def exists(self, ctx: StepContext, output: Output) -> bool:
        return self._holder(_slug_of(ctx, output)) == ctx.tenant_id

    def compensate(self, ctx: StepContext, output: Output) -> None:
        slug = _slug_of(ctx, output)
        try:
            with unit_of_work(self._engine) as session:
                row = session.get(Slot, slug)
                # Never free a slot that another tenant holds now.
                if row is not None and row.tenant_id == ctx.tenant_id:
                    session.delete(row)
        except OperationalError as exc:
            raise TransientUpstreamError(f"could not release slot {slug!r}: {exc}") from exc

    def _try_insert(self, slug: str, tenant_id: str) -> bool:
        try:
            with unit_of_work(self._engine) as session:
                session.add(Slot(slug=slug, tenant_id=tenant_id))
                session.flush()
        except IntegrityError:
            return False
        except OperationalError as exc:
            raise TransientUpstreamError(f"could not reserve slot {slug!r}: {exc}") from exc
        return True

    def _holder(self, slug: str) -> str | None:
        try:
            with unit_of_work(self._engine) as session:
                row = session.get(Slot, slug)
                return None if row is None else row.tenant_id
        except OperationalError as exc:
            raise TransientUpstreamError(f"could not read slot {slug!r}: {exc}") from exc


def _slug_of(ctx: StepContext, output: Output) -> str:
    slug = output.get("slot")
    return slug if isinstance(slug, str) else ctx.slug
