"""``python -m bench.profile``: where the saga worker's pool spends its time, sagas 8 in flight.

By default py-spy samples the pool (wall time: a process that is runnable but waits for a core
counts). Writes, into ``--out`` (default ``bench/results/profile``), the collapsed stacks
(``saga.txt``, for speedscope or ``flamegraph.pl``) and ``top.txt``: the share of the samples by
what the worker was doing (the tables of docs/benchmarks.md). Needs ``py-spy`` (``pip install
py-spy``) and the right to ptrace (root).

``--by-process`` says where the machine's CPU goes instead: each process's CPU per step
(the worker's main process and pool, the audit consumer, the listener, Redis, the bench), the bare
chain, the floor and the saga taking turns (``bench/cpu_by_process.py``).

``--in-process`` measures the saga's own work without Celery, in this process: the thread CPU of a
creation and of a step's body (``bench/in_process.py``). It is the steadiest of these measures,
the one to compare two trees with on a noisy machine; ``--json FILE`` keeps its figures.

``--cpu`` profiles CPU time instead, with cProfile on each pool process's own clock
(``bench/cpu_profile.py``): milliseconds of CPU per step by what the step was doing, and the
``.prof`` files for ``pstats`` or snakeviz. ``--bare`` and ``--floor`` profile the bare chain or
the floor (``bench/floor.py``) instead of the saga.

``--phases`` gives the pool's CPU per step by phase (the step's body, its completion, Celery's
send of the next step, ...) on each process's thread clock, with no profiler's overhead, for the
bare chain and the saga in one run (``bench/phase_clock.py``). cProfile's figures are shares at
best: it inflates call-heavy code several times over; these are the milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import cpu_by_process, cpu_profile, phase_clock
from bench.environment import prepare
from bench.timing import CHAIN_LENGTH

# (category, a frame that puts a sample in it), first match wins: the rows of docs/benchmarks.md.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("publishing events (kombu -> broker)", "Publisher._publish"),
    ("SQLite connect / PRAGMA / close", "_pragmas"),
    ("SQLite connect / PRAGMA / close", "DefaultDialect.connect"),
    ("SQLite connect / PRAGMA / close", "do_close"),
    ("waiting for the write lock (BEGIN IMMEDIATE)", "_begin (service/db/engine.py"),
    ("commit (flush + COMMIT)", "Session.commit"),
    ("commit (flush + COMMIT)", "do_commit"),
    ("lock and fault-plan calls (Redis)", "TenantLocks."),
    ("lock and fault-plan calls (Redis)", "FaultPlans."),
    ("lock and fault-plan calls (Redis)", "StepPreflight.run"),
    ("marking outbox rows published", "OutboxRelay._mark"),
    ("reading earlier outputs", "latest_outputs"),
    ("the step's pick-up read (fence + step_run)", "read_pickup"),
    ("the completion's statements (fence, step_run, outbox)", "StepCompletion.complete"),
    ("fence queries", "lock_unfenced ("),
    ("fence queries", "check_fence ("),
    ("step_run query", "step_run (service/repository"),
    ("building CloudEvents", "build_event"),
)
IN_STEP = ("step_task", "noop (bench/bare_app.py")


# The marking thread waiting for rows (a timed wait py-spy does not always see as idle).
IDLE_BESIDE_STEP = re.compile(r"BatchedMarks\._run \([^)]*\);Condition\.wait")
# Threads of the worker's pool that run beside the step, not in it.
BESIDE_STEP: tuple[tuple[str, str], ...] = (
    ("marking outbox rows published (background thread)", "BatchedMarks._run"),
)


def category(stack: str) -> str:
    for name, frame in BESIDE_STEP:
        if frame in stack:
            return name
    if not any(mark in stack for mark in IN_STEP):
        return "Celery, kombu, billiard around the step"
    for name, frame in CATEGORIES:
        if frame in stack:
            return name
    return "the rest of the step"


def summarise(collapsed: Path, top: Path) -> None:
    """Share of the samples by what the worker was doing (py-spy's raw format: one collapsed
    stack and its count per line)."""
    totals: Counter[str] = Counter()
    samples = 0
    unreadable = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            # py-spy can split a frame whose name holds a line break over two lines.
            unreadable += 1
            continue
        if not stack or IDLE_BESIDE_STEP.search(stack):
            continue
        samples += int(count_text)
        totals[category(stack)] += int(count_text)
    lines = [f"{samples} samples (idle excluded; {unreadable} unreadable lines skipped)"]
    lines += [f"{100 * n / max(samples, 1):5.1f}%  {name}" for name, n in totals.most_common()]
    top.write_text("\n".join(lines) + "\n")


def _cpu(harness: Any, start: Any, sagas: int, name: str, cpu_dir: Path) -> int:
    """Profile from the pool's start (the warm-up included, as a share it is small), stop the
    workers warm so that each pool process writes its profile, and print CPU ms per step."""
    harness.drive(start, sagas, inflight=8)
    steps = (sagas + 2 * harness.concurrency) * CHAIN_LENGTH
    harness.stop_processes()
    worker = "saga" if name == "saga" else "bare"
    rows = cpu_profile.summary(cpu_dir, worker, steps)
    width = max(len(label) for label, _ in rows)
    print(f"CPU per step, {name} ({steps} steps; cProfile inflates ~3x: read the shares)")
    for label, ms in rows:
        print(f"  {label:<{width}}  {ms:6.2f} ms")
    print(f"profiles: {cpu_dir} (pstats, snakeviz)")
    return 0


def _in_process(sagas: int, json_path: Path | None) -> int:
    from bench.in_process import RecordedChains, measure
    from config.settings import get_settings
    from service.bootstrap import build_container

    chains = RecordedChains()
    services = build_container(get_settings(), dispatcher=chains)
    measured = measure(services, chains, sagas, warmup=min(20, sagas))
    print(
        f"in-process, {measured.sagas} sagas ({measured.steps} steps), thread CPU medians:\n"
        f"  a creation (handlers.create, no Celery chain sent)  {measured.creation_cpu_ms:.3f} ms\n"
        f"  a step's body (SagaRunner.run_step)                 {measured.step_cpu_ms:.3f} ms"
        f" (wall {measured.step_wall_ms:.3f} ms)"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(dataclasses.asdict(measured), indent=2) + "\n")
    return 0


def _phases(
    harness: Any, sagas: int, phases_dir: Path, json_path: Path | None, *, wall: bool
) -> int:
    """Drive the bare chains, then the sagas, stop the workers warm (each pool process writes
    its phases), and print both workers' time per step by phase side by side: CPU at 8 in
    flight, or with ``wall`` wall time at one in flight (the per-step latency's parts)."""
    inflight = 1 if wall else 8
    harness.drive(harness.start_bare, sagas, inflight=inflight)
    harness.drive(harness.start_saga, sagas, inflight=inflight)
    harness.stop_processes()
    found = {
        kind: {
            label: {"ms": ms, "calls": calls}
            for label, ms, calls in phase_clock.summary(phases_dir, kind)
        }
        for kind in ("bare", "saga")
    }
    if json_path is not None:
        json_path.write_text(json.dumps(found, indent=2) + "\n")
    bare, saga = found["bare"], found["saga"]
    what = "wall time" if wall else "CPU (thread clock)"
    print(f"pool {what} per step by phase, {sagas} chains of each at {inflight} in flight:")
    print("| phase | bare chain ms | saga ms | saga calls a step |")
    print("|---|---:|---:|---:|")
    for label in phase_clock.LABELS:
        if label not in bare and label not in saga:
            continue
        # Markdown drops leading spaces: an em space a level keeps the nesting visible.
        shown = "\u2003" * ((len(label) - len(label.lstrip())) // 2) + label.strip()
        bare_ms = f"{bare[label]['ms']:.3f}" if label in bare else "-"
        saga_ms = f"{saga[label]['ms']:.3f}" if label in saga else "-"
        calls = f"{saga[label]['calls']:.2f}" if label in saga else "-"
        print(f"| {shown} | {bare_ms} | {saga_ms} | {calls} |")
    return 0


def _by_process(harness: Any, sagas: int, rounds: int) -> int:
    starters = {
        "bare": harness.start_bare,
        "floor": harness.start_floor,
        "saga": harness.start_saga,
    }
    for start in starters.values():  # warm up
        harness.drive(start, 2 * harness.concurrency, inflight=2 * harness.concurrency)
    turns = cpu_by_process.measure(harness, starters, sagas, rounds)
    print(f"CPU ms per step by process, {sagas} chains a turn at 8 in flight:")
    print(cpu_by_process.table(turns))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--sagas", type=int, default=400, help="sagas to run while sampling")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--bare", action="store_true", help="profile the bare chain instead")
    parser.add_argument("--floor", action="store_true", help="profile the floor's chain instead")
    parser.add_argument(
        "--cpu", action="store_true", help="CPU time per step with cProfile, not py-spy samples"
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="pool CPU per step by phase (thread clock), the bare chain and the saga in one run",
    )
    parser.add_argument(
        "--wall",
        action="store_true",
        help="with --phases: wall time, one chain at a time (what a step's latency is made of)",
    )
    parser.add_argument(
        "--by-process",
        action="store_true",
        help="CPU per step of each process, the bare chain, the floor and the saga in turn",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="CPU of a creation and of a step's body without Celery, in this process",
    )
    parser.add_argument(
        "--json", type=Path, help="with --in-process or --phases: write the figures here"
    )
    parser.add_argument("--rounds", type=int, default=2, help="turns of each, with --by-process")
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile"))
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if (
        not (args.cpu or args.phases or args.by_process or args.in_process)
        and not Path(py_spy).exists()
    ):
        parser.error("py-spy is not installed (pip install py-spy), or use --cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bare" if args.bare else "floor" if args.floor else "saga"
    workdir = Path(tempfile.mkdtemp(prefix="provisioner-bench-profile-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        env = prepare(stack, workdir=workdir, rabbitmq=False, postgres=False)
        if args.cpu:
            cpu_dir = args.out / f"cpu-{name}"
            shutil.rmtree(cpu_dir, ignore_errors=True)
            cpu_dir.mkdir(parents=True)
            env.env[cpu_profile.CPU_PROFILE_ENV] = str(cpu_dir.resolve())
        phases_dir = workdir / "phases"
        if args.phases:
            phases_dir.mkdir()
            env.env[phase_clock.PHASES_ENV] = str(phases_dir)
            if args.wall:
                env.env[phase_clock.PHASES_CLOCK_ENV] = "wall"
        from bench import noop_providers

        noop_providers.install()
        from bench.harness import Harness
        from config.logging import configure_logging
        from config.settings import get_settings
        from service.bootstrap import build_container

        configure_logging("WARNING")
        if args.in_process:
            return _in_process(args.sagas, args.json)
        services = build_container(get_settings())
        harness = Harness(env, services, args.concurrency)
        stack.callback(harness.stop_processes)
        harness.start_processes()
        start = {"bare": harness.start_bare, "floor": harness.start_floor}.get(
            name, harness.start_saga
        )
        if args.phases:
            return _phases(harness, args.sagas, phases_dir, args.json, wall=args.wall)
        if args.by_process:
            return _by_process(harness, args.sagas, args.rounds)
        harness.drive(start, 2 * args.concurrency, inflight=2 * args.concurrency)  # warm up
        if args.cpu:
            return _cpu(harness, start, args.sagas, name, cpu_dir)
        worker = harness.saga_worker if name == "saga" else harness.bare_worker
        assert worker is not None
        raw = args.out / f"{name}.txt"
        recorder = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(worker.pid),
                "--subprocesses",
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "--output",
                str(raw),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            harness.drive(start, args.sagas, inflight=8)
        finally:
            recorder.send_signal(signal.SIGINT)  # SIGINT: py-spy writes what it has
            recorder.wait(60)
        summarise(raw, args.out / "top.txt")
        print(f"collapsed stacks: {raw} (speedscope or flamegraph.pl read them); summary:")
        print((args.out / "top.txt").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
