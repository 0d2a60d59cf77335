"""``provisioner faults``: inject upstream faults (held in Redis, seen by every worker).

``service.cli`` calls :func:`register`; its helpers are imported when a command runs, so this
module can be imported on its own (``service.cli`` imports it at its end).
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sagas.steps import STEPS
from service.faults import FaultMode

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
out = Console()
err = Console(stderr=True, soft_wrap=True)

faults_app = typer.Typer(
    help="Inject upstream faults (held in Redis, seen by every worker).", no_args_is_help=True
)


def _cli() -> ModuleType:
    from service import cli

    return cli


@faults_app.command("add")
def faults_add(
    step: Annotated[str, typer.Argument(help="One of: " + ", ".join(STEPS))],
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's slug.")] = None,
    times: Annotated[int | None, typer.Option(min=1, help="Spend on the next N tries.")] = None,
    mode: Annotated[FaultMode, typer.Option(help="error, fatal or hang.")] = FaultMode.ERROR,
    as_json: JsonOpt = False,
) -> None:
    """Make STEP fail (or hang) for a tenant, or for every tenant."""
    try:
        plan = _cli()._c().faults.add(step, mode=mode, tenant=tenant, times=times)
    except ValueError as exc:
        err.print(str(exc), markup=False)
        raise typer.Exit(2) from None
    if as_json:
        shown = plan.__dict__ if not hasattr(plan, "__slots__") else json.loads(plan.to_json())
        _cli()._print_json(shown)
    else:
        out.print(
            f"fault {plan.id}: {plan.mode} on {plan.step} for {plan.tenant or 'any tenant'}"
            + (f", {plan.times} tries" if plan.times else ", until cleared"),
            markup=False,
        )


@faults_app.command("list")
def faults_list(as_json: JsonOpt = False) -> None:
    """The fault plans in force."""
    plans = [json.loads(p.to_json()) for p in _cli()._c().faults.list()]
    if as_json:
        _cli()._print_json(plans)
        return
    table = Table()
    for column in ("id", "step", "tenant", "mode", "times"):
        table.add_column(column)
    for p in plans:
        table.add_row(
            p["id"],
            p["step"],
            p["tenant"] or "*",
            p["mode"],
            "until cleared" if p["times"] is None else str(p["times"]),
        )
    out.print(table)


@faults_app.command("clear")
def faults_clear(
    plan_id: Annotated[str | None, typer.Option("--id", help="Only this plan.")] = None,
) -> None:
    """Remove fault plans (all of them, or one); a hung step wakes up."""
    cleared = _cli()._c().faults.clear(plan_id)
    out.print(f"cleared {cleared} fault plan(s)")


def register(app: typer.Typer) -> None:
    app.add_typer(faults_app, name="faults")
