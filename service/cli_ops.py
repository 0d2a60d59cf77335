"""``provisioner doctor``: the operator's health check. ``service.cli`` calls :func:`register`."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console

from config.settings import get_settings

out = Console(soft_wrap=True)


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Check the broker, Redis, the database and its migrations, queue depths, the outbox
    backlog, stale locks and runs nobody runs; say what to do about each problem.

    Exit status 1 when something is wrong, 0 when all is well. Changes nothing.
    """
    from service.doctor import Doctor, healthy
    from service.doctor import as_json as findings_json

    findings = Doctor(get_settings()).examine()
    if as_json:
        sys.stdout.write(json.dumps(findings_json(findings), indent=2, default=str) + "\n")
    else:
        for finding in findings:
            mark = "ok     " if finding.ok else "PROBLEM"
            out.print(f"{mark} {finding.check}: {finding.summary}", markup=False, highlight=False)
            if finding.fix:
                out.print(f"        fix: {finding.fix}", markup=False, highlight=False)
        verdict = "healthy" if healthy(findings) else "something is wrong (see PROBLEM above)"
        out.print(verdict, markup=False, highlight=False)
    if not healthy(findings):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(doctor)
