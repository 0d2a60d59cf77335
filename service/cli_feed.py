"""CLI commands over the audit store: ``consume``, ``timeline`` and ``diff``.

``service.cli`` calls :func:`register`; its helpers are imported when a command runs, so this
module can be imported on its own (``service.cli`` imports it at its end).
"""

from __future__ import annotations

import json
import sys
import time
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlmodel import Session

from service import feed
from service import repository as repo

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
SlugArg = Annotated[str, typer.Argument(help="The tenant's slug (decommissioned ones too).")]
FOLLOW_POLL_S = 0.5
out = Console()
err = Console(stderr=True)


def _cli() -> ModuleType:
    from service import cli

    return cli


def consume() -> None:
    """Store every event of tenant.events (queue provisioner.audit) in the audit store."""
    base = _cli()
    base._serve_logs()
    from service.audit import AuditConsumer

    c = base._c()
    base._run_until_signal(AuditConsumer(c.settings.broker_url, c.engine).run)


def timeline(
    slug: SlugArg,
    attempt: Annotated[int | None, typer.Option(help="Only this attempt (newest tenant).")] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            help="Print the attempt's events as they are stored, until it completes, fails or "
            "is reset (exit 0 if it completed, 1 otherwise).",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="With --follow: give up after this many seconds (0: never).")
    ] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """What happened to a tenant, attempt by attempt and step by step (from the audit store)."""
    engine = _cli()._c().engine
    if follow:
        raise typer.Exit(_follow(engine, slug, attempt, timeout, as_json))
    if as_json:
        runs = feed.timeline(engine, slug, attempt)
        _cli()._print_json({"slug": slug, "runs": runs, "events": _events(engine, slug, attempt)})
        return
    runs = feed.timeline(engine, slug, attempt)
    if not runs:
        err.print(f"no events of {slug!r} in the audit store", markup=False)
        raise typer.Exit(1)
    tenant = None
    for run in runs:
        if run["tenant_id"] != tenant:
            tenant = run["tenant_id"]
            out.print(f"[bold]{slug}[/] tenant_id={tenant}")
        out.print(_run_table(run))


def _events(engine: Any, slug: str, attempt: int | None) -> list[dict[str, Any]]:
    events = feed.all_events(engine, slug)
    if attempt is None:
        return events
    wanted = {i for run in feed.timeline(engine, slug, attempt) for i in run["event_ids"]}
    return [e for e in events if e["id"] in wanted]


def _run_table(run: dict[str, Any]) -> Table:
    ms = f", {run['duration_ms']} ms" if run["duration_ms"] is not None else ""
    if run["kind"] == "decommission":
        table = Table(title=f"decommission ({run['outcome']}{ms})", title_justify="left")
        for column in ("step", "status", "error"):
            table.add_column(column)
        for step in run["steps"]:
            table.add_row(step["step"], step["status"], step["error"] or "")
        return table
    outcome = run["outcome"]
    if outcome == "failed":
        outcome = f"failed at {run['failed_step']} ({run['error_type']})"
    table = Table(
        title=f"attempt {run['attempt_number']} ({run['trigger'] or '?'}, {outcome}{ms}, "
        f"resumed from {run['resumed_from'] or '?'})",
        title_justify="left",
    )
    for column in ("step", "status", "ms", "error"):
        table.add_column(column)
    for step in run["steps"]:
        table.add_row(
            step["step"],
            feed.describe_step(step),
            "" if step["duration_ms"] is None else str(step["duration_ms"]),
            step["error"] or "",
        )
    return table


def _follow(engine: Any, slug: str, attempt: int | None, timeout: float, as_json: bool) -> int:
    deadline = time.monotonic() + timeout if timeout > 0 else None
    seen: set[str] = set()
    target = None
    while deadline is None or time.monotonic() < deadline:
        target = target or follow_target(engine, slug, attempt)
        if target is not None:
            tenant_id, number = target
            for event in feed.all_events(engine, slug):
                mine = event["tenant_id"] == tenant_id and event["attempt_number"] == number
                if not mine or event["id"] in seen:
                    continue
                seen.add(event["id"])
                _print_event(event, as_json)
                end = feed.ATTEMPT_END.get(event["type"])
                if end is not None:
                    return 0 if end == "completed" else 1
        time.sleep(FOLLOW_POLL_S)
    err.print(f"timed out after {timeout}s following {slug!r}", markup=False)
    return 1


def follow_target(engine: Any, slug: str, attempt: int | None) -> tuple[str, int] | None:
    """The ``(tenant_id, attempt_number)`` that ``timeline --follow`` waits on.

    The tenant tables know of an attempt before its first event reaches the audit store, so
    they are asked first; the audit store answers for what they no longer hold.
    """
    with Session(engine) as session:
        tenant = repo.tenant_by_slug(session, slug)
        if tenant is not None:
            last = repo.last_attempt(session, tenant.id)
            if attempt is not None:
                return tenant.id, attempt
            if last is not None:
                return tenant.id, last.number
    runs = [r for r in feed.timeline(engine, slug, attempt) if r["kind"] == "attempt"]
    return (runs[-1]["tenant_id"], runs[-1]["attempt_number"]) if runs else None


def _print_event(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(event, default=str) + "\n")
    else:
        data = event["data"]
        extra = {
            k: v
            for k, v in data.items()
            if k not in {"tenant_id", "slug", "state", "attempt_number", "step"}
        }
        out.print(
            f"{(event['time'] or '')[11:23]} {event['type']:<40} "
            f"#{event['attempt_number']} {data.get('step') or ''} {json.dumps(extra)}",
            markup=False,
            highlight=False,
        )
    sys.stdout.flush()


def diff(
    slug: SlugArg,
    a: Annotated[int | None, typer.Argument(help="The earlier attempt.")] = None,
    b: Annotated[int | None, typer.Argument(help="The later attempt.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare two attempts step by step (default: the last two)."""
    try:
        result = feed.diff(_cli()._c().engine, slug, a, b)
    except (feed.FeedError, ValueError) as exc:
        err.print(str(exc), markup=False)
        raise typer.Exit(1) from None
    if as_json:
        _cli()._print_json(result)
        return
    na, nb = result["a"]["attempt_number"], result["b"]["attempt_number"]
    table = Table(title=f"{slug}: attempt {na} vs attempt {nb}", title_justify="left")
    for column in ("step", f"attempt {na}", f"attempt {nb}", ""):
        table.add_column(column)
    for step in result["steps"]:
        mark = "" if step["same"] else "[bold red]differs[/]"
        if step["step"] == result["first_divergence"]:
            mark = "[bold red]first divergence[/]"
        table.add_row(step["step"], step["a"], step["b"], mark)
    out.print(table)
    out.print(result["summary"], markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(consume)
    app.command()(timeline)
    app.command()(diff)
