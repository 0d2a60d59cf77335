"""The JSON API under ``/api``: reads (as ``provisioner show/list/timeline/diff --json``) and the
four commands, which call the very same handlers as the command listener and the CLI."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse

from sagas.messages import CommandType
from sagas.rules import Reason
from sagas.states import TenantState
from service import feed
from service.api.auth import allow_read, require_change_token
from service.api.reads import detail_of, timeline_of
from service.api.schemas import (
    PRINTABLE,
    Accepted,
    ChangeTenant,
    CreateTenant,
    Diff,
    Problem,
    RetryTenant,
    TenantDetail,
    TenantSummary,
    Timeline,
)
from service.bootstrap import Container
from service.handlers import Outcome
from service.handlers import Request as Command
from service.views import tenant_list

SlugPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=200,
        pattern=PRINTABLE,
        description="The tenant's slug (URL-encoded).",
        examples=["acme"],
    ),
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=PRINTABLE,
        description="The command's id: the same key is acted on once (like a CloudEvent id on "
        "the bus); a repeat answers `duplicate: true` and does nothing. Default: a new UUID.",
    ),
]


Responses = dict[int | str, dict[str, Any]]


def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


READ_ERRORS: Responses = {
    401: _problem("Not on loopback, and no valid bearer token."),
    403: _problem("Not on loopback, and no token is configured that would allow it."),
    422: _problem("Malformed parameters (`reason`: `malformed`)."),
}
NOT_FOUND: Responses = {404: _problem("No tenant with this slug (`reason`: `unknown_tenant`).")}
CHANGE_ERRORS: Responses = {
    401: _problem("No bearer token, or not `PROVISIONER_API_TOKEN`."),
    403: _problem("`PROVISIONER_API_TOKEN` is not set on the server: changes are disabled."),
    409: _problem(
        "Refused by the rules: `slug_taken`, `locked`, `not_failed`, `not_retryable`, "
        "`retry_cap_reached` or `already_decommissioned`, with what to do instead."
    ),
    422: _problem("Malformed body or parameters (`reason`: `malformed`)."),
}

reads = APIRouter(prefix="/api", tags=["tenants"], dependencies=[Depends(allow_read)])
changes = APIRouter(prefix="/api", tags=["commands"], dependencies=[Depends(require_change_token)])


def container_of(request: Request) -> Container:
    c: Container = request.app.state.container
    return c


Services = Annotated[Container, Depends(container_of)]


def problem(status: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse(
        Problem(reason=reason, message=message).model_dump(exclude_none=True), status_code=status
    )


def unknown(slug: str) -> JSONResponse:
    return problem(
        404,
        Reason.UNKNOWN_TENANT,
        f"no tenant {slug!r}; provision it first (POST /api/tenants)",
    )


# --- reads ---
@reads.get(
    "/tenants",
    response_model=list[TenantSummary],
    summary="List tenants",
    description="Every tenant, oldest first (decommissioned ones too), optionally of one state.",
    responses=READ_ERRORS,
)
def list_tenants(
    c: Services,
    state: Annotated[TenantState | None, Query(description="Only tenants in this state.")] = None,
) -> list[dict[str, Any]]:
    return tenant_list(c.engine, state.value if state else None)


@reads.get(
    "/tenants/{slug}",
    response_model=TenantDetail,
    summary="A tenant",
    description="State, attempts and their steps, the lock (holder attempt, age, TTL), the last "
    "failure, the admin console link once active, and which commands the rules allow now.",
    responses={**READ_ERRORS, **NOT_FOUND},
)
def get_tenant(c: Services, slug: SlugPath) -> Any:
    detail = detail_of(c, slug)
    return detail if detail is not None else unknown(slug)


@reads.get(
    "/tenants/{slug}/timeline",
    response_model=Timeline,
    tags=["feed"],
    summary="The tenant's timeline",
    description="From the audit store, as `provisioner timeline --json`: each run (attempt or "
    "decommission) step by step, and every stored event with its CloudEvent `id` and `type`.",
    responses={**READ_ERRORS, 404: _problem("Neither a tenant nor events of this slug.")},
)
def get_timeline(
    c: Services,
    slug: SlugPath,
    attempt: Annotated[
        int | None, Query(ge=1, le=1_000_000, description="Only this attempt (newest tenant).")
    ] = None,
) -> Any:
    result = timeline_of(c, slug, attempt)
    if not result["runs"]:
        if detail_of(c, slug) is None and attempt is None:
            return unknown(slug)
        if attempt is not None:
            return problem(
                404, Reason.UNKNOWN_TENANT, f"no attempt {attempt} of {slug!r} in the audit store"
            )
    return result


@reads.get(
    "/tenants/{slug}/diff",
    response_model=Diff,
    tags=["feed"],
    summary="Compare two attempts",
    description="As `provisioner diff --json`: attempts `a` and `b` (default: the last two) step "
    "by step, the first step where they diverge, and whether the failure repeated.",
    responses={**READ_ERRORS, 404: _problem("Fewer than two attempts, or no such attempt.")},
)
def get_diff(
    c: Services,
    slug: SlugPath,
    a: Annotated[int | None, Query(ge=1, le=1_000_000, description="The earlier attempt.")] = None,
    b: Annotated[int | None, Query(ge=1, le=1_000_000, description="The later attempt.")] = None,
) -> Any:
    try:
        return feed.diff(c.engine, slug, a, b)
    except feed.FeedError as exc:
        return problem(404, Reason.UNKNOWN_TENANT, str(exc))
    except ValueError as exc:
        return problem(422, Reason.MALFORMED, str(exc))


# --- commands ---
def answer(outcome: Outcome) -> Any:
    if outcome.accepted:
        fields = {name: getattr(outcome, name) for name in Accepted.model_fields}
        return JSONResponse(Accepted(**fields).model_dump(mode="json"), status_code=202)
    reason = outcome.reason or Reason.MALFORMED
    status = {Reason.UNKNOWN_TENANT.value: 404, Reason.MALFORMED.value: 422}.get(str(reason), 409)
    return problem(status, reason, outcome.message)


def command(kind: CommandType, slug: str, key: str | None, who: str, why: str | None) -> Command:
    extra = {"command_id": key} if key else {}
    return Command(kind, slug, requested_by=who, reason=why, **extra)


ACCEPTED: Responses = {202: {"model": Accepted, "description": "Accepted: the run has started."}}


@changes.post(
    "/tenants",
    status_code=202,
    response_model=Accepted,
    summary="Provision a tenant",
    description="Like `tenant.provision_requested` on the bus: the saga starts; follow it with "
    "`GET /api/tenants/{slug}`.",
    responses={**ACCEPTED, **CHANGE_ERRORS},
)
def create_tenant(c: Services, body: CreateTenant, key: IdempotencyKey = None) -> Any:
    request = command(CommandType.PROVISION, body.slug, key, body.requested_by, None)
    return answer(c.handlers.create(request, plan=body.plan, admin_email=body.admin_email))


@changes.post(
    "/tenants/{slug}/retry",
    status_code=202,
    response_model=Accepted,
    summary="Retry a failed tenant",
    description="A new attempt that resumes where the last one failed, reusing what earlier "
    "attempts made and still exists. `force` goes past the retry cap.",
    responses={**ACCEPTED, **CHANGE_ERRORS, **NOT_FOUND},
)
def retry_tenant(
    c: Services,
    slug: SlugPath,
    body: Annotated[RetryTenant | None, Body()] = None,
    key: IdempotencyKey = None,
) -> Any:
    body = body or RetryTenant()
    request = command(CommandType.RETRY, slug, key, body.requested_by, body.reason)
    return answer(c.handlers.retry(request, force=body.force))


@changes.post(
    "/tenants/{slug}/reset",
    status_code=202,
    response_model=Accepted,
    summary="Reset a stuck tenant",
    description="Fence the running attempt, release the lock and mark the tenant failed (then "
    "retry it). With no running attempt nothing changes, and the answer says so.",
    responses={**ACCEPTED, **CHANGE_ERRORS, **NOT_FOUND},
)
def reset_tenant(
    c: Services,
    slug: SlugPath,
    body: Annotated[ChangeTenant | None, Body()] = None,
    key: IdempotencyKey = None,
) -> Any:
    body = body or ChangeTenant()
    return answer(
        c.handlers.reset(command(CommandType.RESET, slug, key, body.requested_by, body.reason))
    )


@changes.post(
    "/tenants/{slug}/decommission",
    status_code=202,
    response_model=Accepted,
    summary="Decommission a tenant",
    description="Undo every step any attempt completed, in reverse; the slot is freed last and "
    "the slug can be provisioned again (a new tenant).",
    responses={**ACCEPTED, **CHANGE_ERRORS, **NOT_FOUND},
)
def decommission_tenant(
    c: Services,
    slug: SlugPath,
    body: Annotated[ChangeTenant | None, Body()] = None,
    key: IdempotencyKey = None,
) -> Any:
    body = body or ChangeTenant()
    request = command(CommandType.DECOMMISSION, slug, key, body.requested_by, body.reason)
    return answer(c.handlers.decommission(request))
