"""``python -m bench``: the saga against a bare Celery chain, side by side, in one run.

Starts its own workers (the saga's, with no-op providers, and the bare chain's: same Celery
configuration, same flags, same concurrency), the command listener and the audit consumer,
against its own claimed Redis database and a temporary SQLite file (``--postgres``: a fresh
schema; ``--rabbitmq``: a virtual host of its own as the broker). Everything it started is
stopped, and everything it claimed given back, however it ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from bench.environment import BenchEnvironment, prepare

if TYPE_CHECKING:
    from bench.harness import Harness

FULL = {
    "sagas": 64,
    "repeat": 3,
    "rss_sagas": 2000,
    "audit_burst": 4000,
    "retry_commands": 20,
    "concurrency": 4,
}
SMOKE = {
    "sagas": 3,
    "repeat": 1,
    "rss_sagas": 8,
    "audit_burst": 50,
    "retry_commands": 2,
    "concurrency": 2,
}


@dataclass(frozen=True, slots=True)
class Options:
    sagas: int
    repeat: int
    rss_sagas: int
    audit_burst: int
    retry_commands: int
    concurrency: int
    smoke: bool
    rabbitmq: bool
    postgres: bool
    json_path: Path | None
    workdir: Path | None
    keep_workdir: bool
    check: bool


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--json", dest="json_path", type=Path, help="write the results here")
    parser.add_argument("--sagas", type=int, help="sagas (and bare chains) per measure [64]")
    parser.add_argument("--repeat", type=int, help="repeats of each measure; medians [3]")
    parser.add_argument("--rss-sagas", type=int, help="sagas between the RSS readings [2000]")
    parser.add_argument("--audit-burst", type=int, help="events in the audit burst [4000]")
    parser.add_argument("--retry-commands", type=int, help="retry commands per repeat [20]")
    parser.add_argument("--concurrency", type=int, help="prefork processes per worker [4]")
    parser.add_argument(
        "--smoke", action="store_true", help="a few sagas, each measure once, targets not asserted"
    )
    parser.add_argument(
        "--rabbitmq", action="store_true", help="RabbitMQ as the broker (a virtual host of its own)"
    )
    parser.add_argument(
        "--postgres", action="store_true", help="PostgreSQL (a fresh schema) instead of SQLite"
    )
    parser.add_argument(
        "--workdir", type=Path, help="logs and SQLite here (kept); default: a temporary directory"
    )
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the temporary directory (logs, database)"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 3 when a target is missed (not with --smoke)"
    )
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    values = {
        k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()
    }
    for name, value in values.items():
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return Options(
        **values,
        smoke=args.smoke,
        rabbitmq=args.rabbitmq,
        postgres=args.postgres,
        json_path=args.json_path,
        workdir=args.workdir,
        keep_workdir=args.keep_workdir,
        check=args.check,
    )


def _stop_on_sigterm() -> None:
    def _raise(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("celery", "kombu", "redis", "sqlalchemy", "psycopg"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
        "versions": versions,
    }


def _repeat(harness: Harness, options: Options, number: int) -> dict[str, Any]:
    """Every measure once; the bare chain and the saga alternate which goes first (the floor
    between them), so that a drift in the machine's load favours neither."""
    from bench import measures

    kinds = ("bare", "floor", "saga") if number % 2 == 0 else ("saga", "floor", "bare")
    step = f"repeat {number + 1}/{options.repeat}"
    one: dict[str, Any] = {"latency": {}, "throughput": {}}
    measures.say(f"{step}: latency ({options.sagas} chains, one at a time)")
    for kind in kinds:
        one["latency"][kind] = measures.latency(harness, kind, options.sagas)
    measures.say(f"{step}: throughput ({options.sagas} chains, {measures.IN_FLIGHT} in flight)")
    slugs: list[str] = []
    for kind in kinds:
        one["throughput"][kind], phase_slugs = measures.throughput(harness, kind, options.sagas)
        if kind == "saga":
            slugs = phase_slugs
    measures.say(f"{step}: audit (burst of {options.audit_burst})")
    one["audit"] = measures.audit(harness, slugs, options.audit_burst)
    measures.say(f"{step}: retry ({options.retry_commands} commands)")
    one["retry"] = measures.retry_latency(harness, options.retry_commands)
    return one


def run(options: Options, env: BenchEnvironment) -> dict[str, Any]:
    # Imported once the environment is set: the settings and Celery apps read it on first use.
    from bench import measures, noop_providers, report
    from bench.harness import Harness

    noop_providers.install()
    from config.logging import configure_logging
    from config.settings import get_settings
    from service.bootstrap import build_container

    configure_logging("WARNING")  # the bench's own output is its progress and the table
    say = measures.say
    started = time.monotonic()
    load_before = machine()["load_average"]
    with ExitStack() as stack:
        services = build_container(get_settings())  # applies the migrations, once
        stack.callback(services.engine.dispose)
        stack.callback(services.publisher.close)
        harness = Harness(env, services, options.concurrency)
        stack.callback(harness.stop_processes)
        say(
            f"starting workers (concurrency {options.concurrency}), listener, audit consumer "
            f"[broker {env.broker}, database {env.database}, Redis db {env.redis_db}]"
        )
        harness.start_processes()
        warm = 2 * options.concurrency
        say(f"warming up ({warm} bare chains, {warm} floor chains, {warm} sagas, 1 retry)")
        harness.drive(harness.start_bare, warm, inflight=warm)
        harness.drive(harness.start_floor, warm, inflight=warm)
        harness.drive(harness.start_saga, warm, inflight=warm)
        measures.retry_latency(harness, 1)
        repeats = [_repeat(harness, options, number) for number in range(options.repeat)]
        say(f"RSS: {options.rss_sagas} sagas, {measures.IN_FLIGHT} in flight")
        rss = measures.rss_growth(harness, options.rss_sagas)
        harness.check_alive()
    summary = report.summarise(repeats, rss)
    targets = report.check_targets(summary)
    info = machine()
    info["load_average_before"] = load_before
    return {
        "config": {
            "broker": env.broker,
            "database": env.database,
            "sagas": options.sagas,
            "repeat": options.repeat,
            "rss_sagas": options.rss_sagas,
            "audit_burst": options.audit_burst,
            "retry_commands": options.retry_commands,
            "concurrency": options.concurrency,
            "in_flight": measures.IN_FLIGHT,
            "smoke": options.smoke,
        },
        "machine": info,
        "summary": summary,
        "targets": targets,
        "repeats": repeats,
        "elapsed_s": time.monotonic() - started,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    _stop_on_sigterm()
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="provisioner-bench-"))
    finished = False
    try:
        with ExitStack() as stack:
            env = prepare(
                stack,
                workdir=workdir.resolve(),
                rabbitmq=options.rabbitmq,
                postgres=options.postgres,
            )
            results = run(options, env)
            finished = True
    finally:
        if finished and options.workdir is None and not options.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not finished:
            print(f"bench: stopped early; logs in {workdir}", file=sys.stderr)
    from bench.report import render

    print(render(results["summary"], results["targets"], asserted=not options.smoke))
    if options.json_path is not None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    missed = [t for t in results["targets"] if not t["pass"]]
    return 3 if options.check and missed and not options.smoke else 0
