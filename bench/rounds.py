"""``python -m bench.rounds``: many short rounds of the two measures that targets 1 and 2 read.

Each round measures per-step latency (chains one at a time) and throughput (8 in flight) of the
bare chain, the floor and the saga, in an order that alternates from round to round, and takes
the ratios within the round. On a machine whose speed drifts by 2x within a minute, one full
``python -m bench`` run (three repeats) cannot tell two trees apart by 0.1x; the medians of many
rounds, run in each tree in turn, can (docs/benchmarks.md, round 9). Unlike ``bench.profile
--in-process``, it sees changes in how a step hands over to the next: Celery, Redis, the pool.

No audit, retry or RSS measure, and no targets: ``python -m bench`` is the benchmark.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.environment import prepare
from bench.stats import median

KINDS = ("bare", "floor", "saga")


def _round(harness: Any, number: int, chains: int) -> dict[str, Any]:
    from bench import measures

    kinds = KINDS if number % 2 == 0 else tuple(reversed(KINDS))
    latency = {kind: measures.latency(harness, kind, chains)["step_p50_ms"] for kind in kinds}
    throughput = {
        kind: measures.throughput(harness, kind, chains)[0]["steps_per_s"] for kind in kinds
    }
    return {
        "step_p50_ms": latency,
        "steps_per_s": throughput,
        "latency_saga_bare": latency["saga"] / latency["bare"],
        "latency_floor_bare": latency["floor"] / latency["bare"],
        "latency_saga_floor": latency["saga"] / latency["floor"],
        "throughput_saga_bare": throughput["saga"] / throughput["bare"],
        "throughput_floor_bare": throughput["floor"] / throughput["bare"],
    }


RATIOS = (
    "latency_saga_bare",
    "latency_floor_bare",
    "latency_saga_floor",
    "throughput_saga_bare",
    "throughput_floor_bare",
)


def summary(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """The median of each ratio over the rounds, and of the saga's and the bare chain's p50."""
    medians = {key: median([r[key] for r in rounds]) for key in RATIOS}
    for kind in ("bare", "saga"):
        medians[f"{kind}_step_p50_ms"] = median([r["step_p50_ms"][kind] for r in rounds])
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rounds", description=__doc__)
    parser.add_argument("--rounds", type=int, default=6, help="rounds [6]")
    parser.add_argument("--sagas", type=int, default=64, help="chains per measure and kind [64]")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", type=Path, help="write every round and the medians here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.sagas < 1:
        parser.error("--rounds and --sagas must be at least 1")
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="provisioner-bench-rounds-"))
        stack.callback(shutil.rmtree, workdir, True)
        env = prepare(stack, workdir=workdir, rabbitmq=False, postgres=False)
        from bench import noop_providers

        noop_providers.install()
        from bench.harness import Harness
        from config.logging import configure_logging
        from config.settings import get_settings
        from service.bootstrap import build_container

        configure_logging("WARNING")
        services = build_container(get_settings())
        stack.callback(services.engine.dispose)
        stack.callback(services.publisher.close)
        harness = Harness(env, services, args.concurrency)
        stack.callback(harness.stop_processes)
        harness.start_processes()
        warm = 2 * args.concurrency
        for start in (harness.start_bare, harness.start_floor, harness.start_saga):
            harness.drive(start, warm, inflight=warm)
        rounds = []
        for number in range(args.rounds):
            one = _round(harness, number, args.sagas)
            rounds.append(one)
            print(
                f"round {number + 1}: latency saga/bare {one['latency_saga_bare']:.2f}, "
                f"floor/bare {one['latency_floor_bare']:.2f}; "
                f"throughput saga/bare {one['throughput_saga_bare']:.2f}",
                file=sys.stderr,
                flush=True,
            )
    medians = summary(rounds)
    for key, value in medians.items():
        print(f"{key:28} {value:8.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": rounds, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
