"""Every change route of the HTTP API refuses a request without the token.

The routes are found by walking the application (every method but GET/HEAD/OPTIONS), so a
change route added later is covered without editing this test; the requests go to real
``provisioner api`` processes (one with a token set, one without). Nothing may reach the
handlers: a command that did would leave a ``processed_commands`` row, even for an unknown
tenant.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import func
from sqlmodel import Session, select

from service.api.app import create_app
from service.bootstrap import Container
from service.db.models import OutboxEvent, ProcessedCommand, Tenant
from tests.support.api import ApiServer, call, start_api

pytestmark = pytest.mark.integration

TOKEN = "the-right-token-" + uuid.uuid4().hex
SAFE = {"GET", "HEAD", "OPTIONS"}


def change_routes(app: FastAPI) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def walk(routes: list[Any]) -> None:
        for route in routes:
            inner = getattr(route, "original_router", None)
            if inner is not None:  # FastAPI's included router
                walk(list(inner.routes))
                continue
            for method in sorted(set(getattr(route, "methods", None) or ()) - SAFE):
                found.append((method, route.path))

    walk(list(app.routes))
    return found


@pytest.fixture(scope="module")
def servers(workdir: Path) -> Iterator[tuple[ApiServer, ApiServer]]:
    guarded = start_api(workdir, token=TOKEN, name="api-token-guarded")
    try:
        closed = start_api(workdir, token=None, name="api-token-unset")
    except BaseException:
        guarded.stop()
        raise
    yield guarded, closed
    guarded.stop()
    closed.stop()


def counts(services: Container) -> tuple[int, ...]:
    with Session(services.engine) as session:
        return tuple(
            int(session.exec(select(func.count()).select_from(model)).one())
            for model in (ProcessedCommand, Tenant, OutboxEvent)
        )


def body_for(path: str, slug: str) -> dict[str, Any]:
    return {"slug": slug, "plan": "pro"} if path == "/api/tenants" else {"requested_by": "x"}


BAD_CREDENTIALS: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": TOKEN},  # no scheme
    {"Authorization": "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()},
    {"Authorization": "Bearer "},
    {"Cookie": f"provisioner_token={TOKEN}"},  # the pages' cookie: reads only
    {"X-Api-Token": TOKEN},
]


def test_every_change_route_refuses_requests_without_the_token(
    services: Container, servers: tuple[ApiServer, ApiServer]
) -> None:
    guarded, closed = servers
    slug = f"no-token-{uuid.uuid4().hex[:8]}"
    routes = change_routes(create_app(services))
    assert {
        ("POST", "/api/tenants"),
        ("POST", "/api/tenants/{slug}/retry"),
        ("POST", "/api/tenants/{slug}/reset"),
        ("POST", "/api/tenants/{slug}/decommission"),
    } <= set(routes)
    before = counts(services)
    for method, path in routes:
        url = path.replace("{slug}", slug)
        for headers in BAD_CREDENTIALS:
            answer = call(guarded.url + url, method, body_for(path, slug), headers=headers)
            assert answer.status == 401, (method, path, headers, answer.text)
            assert answer.json()["reason"] == "unauthorized"
            assert answer.headers["www-authenticate"].startswith("Bearer")

    # A server with no token set refuses every change, whatever the request carries.
    for method, path in routes:
        url = path.replace("{slug}", slug)
        for headers in [*BAD_CREDENTIALS, {"Authorization": f"Bearer {TOKEN}"}]:
            answer = call(closed.url + url, method, body_for(path, slug), headers=headers)
            assert answer.status == 403, (method, path, headers, answer.text)
            assert answer.json()["reason"] == "changes_disabled"
    assert counts(services) == before, "a refused request reached the handlers"

    # The control: with the token the same request does reach them (an unknown tenant: 404).
    answer = call(f"{guarded.url}/api/tenants/{slug}/reset", "POST", {}, token=TOKEN)
    assert answer.status == 404, answer.text
    assert counts(services)[0] == before[0] + 1
