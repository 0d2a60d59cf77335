"""``provisioner demo``: the product's story in about a minute, against a running service.

Five short chapters, each printing the command an operator would type to do it by hand: a tenant
provisioned; one failing at ``issue_certificate``, then retried (resuming where it failed); a
stuck one, whose retry is refused ``locked`` until it is reset; and a decommission that frees the
slug for a new tenant. Slugs are new on every run (``demo-<4 hex>-acme``), so runs never collide.
``service.cli`` calls :func:`register`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from types import ModuleType
from typing import Annotated, Any

import typer
from redis import RedisError
from rich.console import Console
from rich.table import Table
from sqlmodel import Session, col, select

from sagas.messages import CommandType, EventType
from service import feed
from service.bootstrap import Container
from service.db.models import OutboxEvent
from service.demo_service import DemoServiceError, OwnService, worker_answers
from service.embedded_redis import missing as missing_redis
from service.faults import FaultMode
from service.handlers import Outcome, Request
from service.views import lock_view, tenant_detail

REQUESTER = "demo"
POLL_S = 0.2
AUDIT_WAIT_S = 8.0
Detail = dict[str, Any]


class DemoFailed(RuntimeError):
    """The story could not go on; ``str()`` says at which point."""


def _cli() -> ModuleType:
    from service import cli

    return cli


class Story:
    def __init__(self, c: Container, out: Console, timeout_s: float, audit_wait_s: float) -> None:
        self.c = c
        self.out = out
        self.timeout_s = timeout_s
        self.audit_wait_s = audit_wait_s
        run = uuid.uuid4().hex[:4]
        self.acme, self.beta, self.gamma = (f"demo-{run}-{n}" for n in ("acme", "beta", "gamma"))
        self.fault_ids: set[str] = set()

    # --- telling ---
    def chapter(self, title: str) -> None:
        self.out.print()
        self.out.rule(f"[bold]{title}[/]", align="left")

    def typed(self, command: str) -> None:
        self.out.print(f"[bold cyan]$ provisioner {command}[/]", highlight=False)

    def said(self, text: str) -> None:
        self.out.print(f"  {text}", highlight=False)

    # --- acting ---
    def command(self, outcome: Outcome, *, expect_reason: str | None = None) -> Outcome:
        if expect_reason is None and not outcome.accepted:
            raise DemoFailed(
                f"{outcome.command_type} {outcome.slug} was rejected: {outcome.message}"
            )
        if expect_reason is not None and outcome.reason != expect_reason:
            raise DemoFailed(f"expected a {expect_reason!r} rejection, got: {outcome.message}")
        text = outcome.message if outcome.accepted else f"rejected ({outcome.reason}): "
        self.said(text + ("" if outcome.accepted else outcome.message))
        return outcome

    def detail(self, slug: str) -> Detail:
        found = tenant_detail(self.c.engine, self.c.locks, self.c.settings, slug)
        if found is None:
            raise DemoFailed(f"no tenant {slug!r} in the database")
        return found

    def wait(self, slug: str, what: str, done: Callable[[Detail], bool]) -> Detail:
        started = time.monotonic()
        with self.out.status(f"waiting until {slug} {what}"):
            while time.monotonic() - started < self.timeout_s:
                detail = self.detail(slug)
                if done(detail):
                    return detail
                time.sleep(POLL_S)
        raise DemoFailed(
            f"{slug} was still {self.detail(slug)['state']} after {self.timeout_s:.0f}s waiting "
            f"until it {what}; is a worker running for this broker and database?"
        )

    def wait_state(self, slug: str, state: str) -> Detail:
        started = time.monotonic()
        detail = self.wait(slug, f"is {state}", lambda d: d["state"] == state)
        self.said(f"[bold]{slug}[/] is [bold]{state}[/] ({time.monotonic() - started:.1f}s)")
        return detail

    def create(self, slug: str, plan: str) -> Outcome:
        self.typed(f"create {slug} --plan {plan}")
        return self.command(
            self.c.handlers.create(Request(CommandType.PROVISION, slug, REQUESTER), plan=plan)
        )

    def fault(self, step: str, slug: str, mode: FaultMode) -> str:
        self.typed(f"faults add {step} --tenant {slug} --mode {mode}")
        plan = self.c.faults.add(step, mode=mode, tenant=slug)
        self.fault_ids.add(plan.id)
        self.said(f"fault {plan.id}: {mode} on {step} for {slug}, until cleared")
        return plan.id

    def clear(self, plan_id: str) -> None:
        self.typed(f"faults clear --id {plan_id}")
        self.said(f"cleared {self.c.faults.clear(plan_id)} fault plan(s)")
        self.fault_ids.discard(plan_id)

    def clean_up(self) -> None:
        """Clear the fault plans a story cut short left behind (a hang would last 10 minutes)."""
        for plan_id in sorted(self.fault_ids):
            self.c.faults.clear(plan_id)
        self.fault_ids.clear()

    # --- the story ---
    def tell(self) -> None:
        self.provision()
        self.fail_and_retry()
        self.stuck_and_reset()
        self.decommission_and_reuse()

    def provision(self) -> None:
        self.chapter("1. Provision a tenant: eight steps, one Celery chain")
        self.create(self.acme, "pro")
        detail = self.wait_state(self.acme, "active")
        steps = detail["attempts"][-1]["steps"]
        self.said(f"{len(steps)} steps: " + ", ".join(s["step"] for s in steps))
        self.said(f"Admin Console: [link]{detail['admin_console_url']}[/]")
        self.typed(f"show {self.acme}")

    def fail_and_retry(self) -> None:
        self.chapter("2. An upstream fails: the certificate step")
        plan_id = self.fault("issue_certificate", self.beta, FaultMode.ERROR)
        self.create(self.beta, "free")
        detail = self.wait_state(self.beta, "failed")
        failure = detail["last_failure"] or {}
        self.said(
            f"Failed at [bold]{failure.get('step')}[/] after {failure.get('tries')} tries: "
            f"{failure.get('error_type')}: {failure.get('message')}"
        )
        self.said("the event every subscriber of tenant.events got:")
        self.out.print_json(json.dumps(self.failed_event(self.beta, detail["tenant_id"])))
        self.typed(f"show {self.beta} --json   # .last_failure")

        self.chapter("3. The upstream recovers: retry resumes where it failed")
        self.clear(plan_id)
        self.typed(f"retry {self.beta}")
        outcome = self.command(
            self.c.handlers.retry(Request(CommandType.RETRY, self.beta, REQUESTER))
        )
        reused = outcome.details.get("reused_steps") or []
        self.said(
            f"attempt 2 checked that what the first {len(reused)} steps made still exists, "
            f"so it reuses them and runs from [bold]{outcome.details.get('resumed_from')}[/]"
        )
        self.wait_state(self.beta, "active")
        self.typed(f"diff {self.beta}")
        self.show_diff(self.beta)

    def failed_event(self, slug: str, tenant_id: str) -> dict[str, Any]:
        with Session(self.c.engine) as session:
            rows = session.exec(
                select(OutboxEvent)
                .where(OutboxEvent.subject == slug, OutboxEvent.type == EventType.FAILED.value)
                .order_by(col(OutboxEvent.id).desc())
            ).all()
        for row in rows:
            event: dict[str, Any] = json.loads(row.body)
            if event.get("data", {}).get("tenant_id") == tenant_id:
                keys = ("failed_activity", "details", "retryable", "retries_left", "state")
                return {
                    "type": event["type"],
                    "subject": event["subject"],
                    "data": {k: event["data"].get(k) for k in keys},
                }
        raise DemoFailed(f"no {EventType.FAILED.value} event of {slug} in the outbox")

    def show_diff(self, slug: str) -> None:
        rows, summary = self.audit_diff(slug)
        if rows is None:
            self.said(
                "(the audit store has no record of both attempts yet: is `provisioner consume` "
                "running? The same comparison, from the tenant's own tables:)"
            )
            rows, summary = self.table_diff(slug)
        table = Table(title_justify="left", box=None, padding=(0, 2))
        for column in ("step", "attempt 1", "attempt 2"):
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        self.out.print(table)
        self.said(summary)

    def audit_diff(self, slug: str) -> tuple[list[tuple[str, str, str]] | None, str]:
        deadline = time.monotonic() + self.audit_wait_s
        while True:
            try:
                result = feed.diff(self.c.engine, slug)
            except feed.FeedError:
                result = None
            if result is not None and result["b"]["outcome"] == "completed":
                steps = result["steps"]
                return [(s["step"], s["a"], s["b"]) for s in steps], result["summary"]
            if time.monotonic() >= deadline:
                return None, ""
            time.sleep(0.5)

    def table_diff(self, slug: str) -> tuple[list[tuple[str, str, str]], str]:
        first, second = self.detail(slug)["attempts"][-2:]

        def describe(run: dict[str, Any] | None) -> str:
            if run is None:
                return "not run"
            if run["reused_from_attempt"]:
                return f"skipped (reused from attempt {run['reused_from_attempt']})"
            if run["error_type"]:
                return f"{run['status']} with {run['error_type']} ({run['tries']} tries)"
            return str(run["status"])

        by_first = {run["step"]: run for run in first["steps"]}
        by_second = {run["step"]: run for run in second["steps"]}
        names = [s["step"] for s in first["steps"]]
        names += [s["step"] for s in second["steps"] if s["step"] not in by_first]
        rows = [(n, describe(by_first.get(n)), describe(by_second.get(n))) for n in names]
        return rows, f"attempt 2 resumed at {second['resumed_from']} and {second['state']}"

    def stuck_and_reset(self) -> None:
        self.chapter("4. A stuck saga: retry is refused until an operator resets it")
        plan_id = self.fault("register_workflows", self.gamma, FaultMode.HANG)
        self.create(self.gamma, "pro")

        def hanging(detail: Detail) -> bool:
            steps = detail["attempts"][-1]["steps"] if detail["attempts"] else []
            return any(
                s["step"] == "register_workflows" and s["status"] == "running" for s in steps
            )

        self.wait(self.gamma, "hangs at register_workflows", hanging)
        lock = lock_view(self.c.locks.info(self.gamma))
        self.said(f"{self.gamma} hangs at [bold]register_workflows[/], still provisioning")
        self.typed(f"lock {self.gamma}")
        self.said(
            f"held by run {lock['holder_run_id']} (epoch {lock['epoch']}, ttl {lock['ttl_s']}s)"
        )
        self.typed(f"retry {self.gamma}")
        request = Request(CommandType.RETRY, self.gamma, REQUESTER)
        self.command(self.c.handlers.retry(request), expect_reason="locked")
        self.typed(f"reset {self.gamma}")
        self.command(self.c.handlers.reset(Request(CommandType.RESET, self.gamma, REQUESTER)))
        self.said(f"{self.gamma} is [bold]{self.detail(self.gamma)['state']}[/]; lock free")
        self.clear(plan_id)
        self.said("the hung step wakes up, finds its attempt fenced, writes nothing and stops")
        self.typed(f"retry {self.gamma}")
        self.command(self.c.handlers.retry(Request(CommandType.RETRY, self.gamma, REQUESTER)))
        self.wait_state(self.gamma, "active")

    def decommission_and_reuse(self) -> None:
        self.chapter("5. Decommission a tenant; its slug is free again")
        old = self.detail(self.acme)["tenant_id"]
        self.typed(f"decommission {self.acme}")
        request = Request(CommandType.DECOMMISSION, self.acme, REQUESTER)
        self.command(self.c.handlers.decommission(request))
        self.wait_state(self.acme, "decommissioned")
        self.create(self.acme, "enterprise")
        new = self.wait_state(self.acme, "active")["tenant_id"]
        self.said(f"slug {self.acme} reused by a new tenant: tenant_id {new} (was {old})")


def demo(
    start: Annotated[
        bool,
        typer.Option(
            "--start", help="Run a private `provisioner up` for the demo even if a worker answers."
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for any one step of the story.")
    ] = 120.0,
) -> None:
    """Walk through the product in about a minute: provision, fail, retry, reset, decommission.

    Uses the running service (a worker answering on the broker); if none answers, or with
    --start, runs `provisioner up` itself and stops it at the end. Each step prints the
    command that does it by hand.
    """
    cli = _cli()
    out = Console(highlight=False, soft_wrap=True)
    settings = cli.get_settings()
    own: OwnService | None = None
    if not start and worker_answers(settings):
        out.print("Using the running service (a worker answered on the broker).")
    else:
        own = OwnService()
        why = "--start" if start else "No worker answered"
        out.print(f"{why}: starting `provisioner up` (log: {own.log_path}) ...")
        for target in missing_redis([settings.redis_url, settings.broker_url]):
            out.print(f"No Redis answers at {target.url}: `up` runs an embedded one there.")
    started = time.monotonic()
    story: Story | None = None
    try:
        if own is not None:
            own.start()
            out.print(f"`provisioner up` is ready ({time.monotonic() - started:.0f}s).")
        story = Story(cli._c(), out, timeout, AUDIT_WAIT_S * (3 if own else 1))
        story.tell()
    except (DemoFailed, DemoServiceError) as exc:
        cli.err.print(f"demo stopped: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    finally:
        if story is not None:
            with suppress(RedisError):  # a Redis gone mid-story must not hide why it stopped
                story.clean_up()
        if own is not None:
            out.print(f"Stopping the demo's `provisioner up` (exit {own.stop()}).")
    out.print()
    out.rule(f"[bold]Done in {time.monotonic() - started:.0f}s[/]", align="left")
    out.print(
        f"Tenants of this run: {story.acme}, {story.beta}, {story.gamma}. "
        f"Look around: provisioner list, provisioner timeline {story.beta}."
    )


def register(app: typer.Typer) -> None:
    app.command()(demo)
