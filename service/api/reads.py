"""What the JSON reads and the pages show, built from the CLI's read models (``service.views``,
``service.feed``) so that the API, the pages and ``provisioner show/timeline/diff`` agree."""

from __future__ import annotations

from typing import Any

from service import feed
from service.api.actions import available_actions
from service.bootstrap import Container
from service.providers.base import StepContext
from service.providers.console import console_file
from service.providers.files import read_json
from service.views import tenant_detail


def detail_of(c: Container, slug: str) -> dict[str, Any] | None:
    """``provisioner show --json``, plus who holds the lock and which actions are open."""
    detail = tenant_detail(c.engine, c.locks, c.settings, slug)
    if detail is None:
        return None
    holder = detail["lock"]["holder_run_id"]
    detail["lock"]["holder_attempt_number"] = next(
        (a["attempt_number"] for a in detail["attempts"] if a["attempt_id"] == holder), None
    )
    detail["actions"] = available_actions(detail)
    return detail


def timeline_of(c: Container, slug: str, attempt: int | None) -> dict[str, Any]:
    """``provisioner timeline --json``: the runs and every stored event (of that attempt)."""
    runs = feed.timeline(c.engine, slug, attempt)
    events = feed.all_events(c.engine, slug)
    if attempt is not None:
        wanted = {event_id for run in runs for event_id in run["event_ids"]}
        events = [e for e in events if e["id"] in wanted]
    return {"slug": slug, "runs": runs, "events": events}


def console_of(c: Container, detail: dict[str, Any]) -> dict[str, Any] | None:
    """The admin console configuration the ``configure_admin_console`` step wrote, if any."""
    ctx = StepContext(
        tenant_id=detail["tenant_id"],
        slug=detail["slug"],
        plan=detail["plan"],
        admin_email=detail["admin_email"],
        attempt_number=0,
        data_dir=c.settings.data_dir,
        console_url=c.settings.console_url_for(detail["slug"]),
    )
    try:
        config = read_json(console_file(ctx))
    except Exception:
        return None
    return dict(config) if isinstance(config, dict) else None
