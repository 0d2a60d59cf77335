"""``provisioner api``: serve the HTTP API, the tenant pages and ``/metrics`` with uvicorn.

``service.cli`` calls :func:`register`; FastAPI and uvicorn are imported when the command runs.
"""

from __future__ import annotations

import logging
from types import ModuleType

import structlog
import typer

log = structlog.get_logger(__name__)


def _cli() -> ModuleType:
    from service import cli

    return cli


def api() -> None:
    """Serve the HTTP API, the tenant pages and /metrics on PROVISIONER_API_BIND.

    Changes need 'Authorization: Bearer $PROVISIONER_API_TOKEN' (refused when it is unset);
    reads are open to loopback clients, others need the token too. OpenAPI: /openapi.json.
    """
    base = _cli()
    base._serve_logs()
    import uvicorn

    from service.api.app import create_app

    c = base._c()
    host = c.settings.api_host.strip("[]")  # "[::1]:8080" binds ::1
    app = create_app(c)
    log.info(
        "api.starting",
        bind=c.settings.api_bind,
        changes="enabled" if c.settings.api_token is not None else "disabled (no token)",
    )
    # log_config=None: uvicorn's lines go through our logging set-up, not its own; its
    # "Uvicorn running on ..." line says the socket is bound.
    logging.getLogger("uvicorn").setLevel(logging.INFO)
    uvicorn.run(
        app,
        host=host,
        port=c.settings.api_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


def register(app: typer.Typer) -> None:
    app.command()(api)
