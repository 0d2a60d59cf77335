"""The FastAPI application: JSON API, pages, ``/metrics``; built around one container."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from sagas.rules import Reason
from service.api import pages as page_routes
from service.api.auth import AccessDenied, allow_read
from service.api.pages import HERE, render
from service.api.routes import READ_ERRORS, changes, problem, reads
from service.bootstrap import Container, container
from service.gauges import LiveGauges
from service.metrics import exposition

log = structlog.get_logger(__name__)

DESCRIPTION = """\
Provision, retry, reset and decommission tenants of the auth platform, and read what happened.

**Changes** (every `POST`) need `Authorization: Bearer <PROVISIONER_API_TOKEN>`; when the server
has no token set, changes are refused (403). **Reads** are open to clients on loopback; others
need the token as well. Commands go through the same handlers as the command bus and the CLI,
with the same rules: a refusal is a 409 (or 404 for an unknown slug, 422 for a malformed request)
whose body carries the contract's `reason` and a `message` saying what to do instead. An
`Idempotency-Key` header makes a command act once, like a CloudEvent id on the bus.
"""

TAGS = [
    {"name": "tenants", "description": "Reads: the same data as `provisioner show/list`."},
    {"name": "commands", "description": "Changes: create, retry, reset, decommission."},
    {"name": "feed", "description": "The audit store: timeline and diff."},
    {"name": "metrics", "description": "Prometheus text format."},
]
PAGE_PREFIXES = ("/tenants", "/console")


def _version() -> str:
    try:
        return version("tenant-provisioner")
    except PackageNotFoundError:
        return "0.0.0"


def _wants_html(request: Request) -> bool:
    return request.url.path == "/" or request.url.path.startswith(PAGE_PREFIXES)


def _field(loc: Any) -> str:
    return ".".join(str(part) for part in loc if part not in ("body",)) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AccessDenied)
    async def _denied(request: Request, exc: AccessDenied) -> Response:
        if _wants_html(request):
            response: Response = render(
                request,
                "denied.html",
                status_code=exc.status_code,
                title="Token needed",
                message=exc.message,
            )
        else:
            response = problem(exc.status_code, exc.reason, exc.message)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _malformed(_request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"field": _field(e.get("loc", ())), "message": str(e.get("msg", "")), "type": e["type"]}
            for e in exc.errors()
        ]
        message = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5]) or "malformed"
        return JSONResponse(
            jsonable_encoder(
                {"reason": Reason.MALFORMED.value, "message": message, "errors": errors}
            ),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # a body FastAPI cannot even decode: malformed, like bad JSON
            return problem(422, Reason.MALFORMED, f"malformed request: {exc.detail}")
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        if _wants_html(request) and exc.status_code == 404:
            return render(
                request, "error.html", status_code=404, title="Not found", message=str(exc.detail)
            )
        return problem(exc.status_code, reason, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> Response:
        log.exception("api.internal_error", error=str(exc)[:500])
        return problem(500, "internal_error", "the server failed; see its log")


def create_app(services: Container | None = None) -> FastAPI:
    """The app, around ``services`` (default: the process's container)."""
    app = FastAPI(
        title="Tenant provisioner",
        version=_version(),
        description=DESCRIPTION,
        openapi_tags=TAGS,
        # The interactive docs load their scripts from a CDN at run time; /openapi.json is local.
        docs_url=None,
        redoc_url=None,
    )
    c = services or container()
    app.state.container = c
    app.state.settings = c.settings
    gauges = LiveGauges(engine=c.engine, redis=c.redis, locks=c.locks)

    app.include_router(reads)
    app.include_router(changes)
    app.include_router(page_routes.open_pages)
    app.include_router(page_routes.pages)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    install_error_handlers(app)

    @app.get(
        "/metrics",
        tags=["metrics"],
        summary="Prometheus metrics",
        description="Counters and histograms of every process (workers, listener, CLI, API), "
        "added up from `<PROVISIONER_DATA_DIR>/metrics`, and gauges read at scrape time: locks "
        "held and their age, outbox backlog, audit lag, tenants by state.",
        dependencies=[Depends(allow_read)],
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            **{k: v for k, v in READ_ERRORS.items() if k != 422},
        },
    )
    def metrics() -> Response:
        body, content_type = exposition(gauges)
        return Response(body, media_type=content_type)

    return app
