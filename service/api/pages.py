"""Server-rendered pages (Jinja2): the tenant list, the tenant page and a minimal admin console.

No front-end build: the tenant page's behaviour is ``static/tenant.js`` (vanilla JS), which polls
``GET /api/tenants/{slug}`` while a run is going on and sends the actions with the token the
operator pasted (kept in ``sessionStorage``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from sagas.states import TenantState
from sagas.steps import STEPS
from service.api.auth import TOKEN_COOKIE, allow_read
from service.api.reads import console_of, detail_of
from service.api.routes import Services, SlugPath
from service.views import tenant_list

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")

open_pages = APIRouter(include_in_schema=False)
pages = APIRouter(include_in_schema=False, dependencies=[Depends(allow_read)])

SETTLED = {"active", "failed", "decommissioned"}


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, {"token_cookie": TOKEN_COOKIE, **context}, status_code=status_code
    )


@open_pages.get("/")
def home() -> Response:
    return RedirectResponse("/tenants", status_code=302)


@pages.get("/tenants", response_class=HTMLResponse)
def tenants_page(
    request: Request,
    c: Services,
    state: Annotated[TenantState | None, Query()] = None,
) -> HTMLResponse:
    rows = tenant_list(c.engine, state.value if state else None)
    return render(
        request,
        "tenants.html",
        tenants=list(reversed(rows)),
        state=state.value if state else None,
        states=[s.value for s in TenantState],
    )


def _not_found(request: Request, slug: str) -> HTMLResponse:
    return render(
        request,
        "error.html",
        status_code=404,
        title="No such tenant",
        message=f"There is no tenant {slug!r}.",
    )


@pages.get("/tenants/{slug}", response_class=HTMLResponse)
def tenant_page(request: Request, c: Services, slug: SlugPath) -> HTMLResponse:
    detail = detail_of(c, slug)
    if detail is None:
        return _not_found(request, slug)
    actions = {a["name"]: a for a in detail["actions"]}
    return render(
        request,
        "tenant.html",
        t=detail,
        actions=actions,
        steps=list(STEPS),
        attempts=list(reversed(detail["attempts"])),
        polling=detail["state"] not in SETTLED,
        stale_lock=detail["lock"]["held"] and detail["state"] == "failed",
    )


@pages.get("/console/{slug}", response_class=HTMLResponse)
def console_page(request: Request, c: Services, slug: SlugPath) -> HTMLResponse:
    detail = detail_of(c, slug)
    if detail is None:
        return _not_found(request, slug)
    config = console_of(c, detail) if detail["state"] == "active" else None
    return render(
        request,
        "console.html",
        status_code=200 if config else 404,
        t=detail,
        config=config,
    )
