"""CPU per step of every process on the machine's side of a run, 8 chains in flight.

``python -m bench.profile --by-process``: the bare chain, the floor and the saga take turns
(``--rounds`` times each); for each turn, the user + system CPU that each process spent,
divided by the steps run: the worker's main process and its pool apart, the audit consumer, the
command listener, the Redis server and the bench itself (which creates the sagas: the creation
handler runs in it, where the bare chain and the floor only send a chain). What the throughput
target asks of the saga is a share of two cores; this says where they go (docs/benchmarks.md,
round 5). The Redis server is found by name: on a machine where other clients use it, its
figure includes their work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psutil

from bench.timing import CHAIN_LENGTH

SETTLE_S = 0.3


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def _redis_server() -> psutil.Process | None:
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "redis-server":
            return process
    return None


class ProcessCpu:
    """CPU seconds by process name, read now."""

    def __init__(self, harness: Any) -> None:
        self._harness = harness
        self._redis = _redis_server()
        self._me = psutil.Process()

    def read(self) -> dict[str, float]:
        seconds: dict[str, float] = {}
        for process in self._harness.group.processes:
            tree = process.tree()
            if not tree:
                continue
            if process.name.endswith("-worker"):
                seconds[f"{process.name}: main"] = _cpu(tree[0])
                seconds[f"{process.name}: pool"] = sum(_cpu(child) for child in tree[1:])
            else:
                seconds[process.name] = process.cpu_seconds()
        if self._redis is not None:
            seconds["redis-server"] = _cpu(self._redis)
        seconds["bench (creates the sagas)"] = _cpu(self._me)
        return seconds


def measure(
    harness: Any, starters: dict[str, Callable[[], Any]], chains: int, rounds: int
) -> list[tuple[str, float, dict[str, float]]]:
    """(kind, steps per second, CPU ms per step by process) for each turn, in the order run."""
    # Imported here, as bench.profile imports the harness: once the bench's environment is set.
    from bench.measures import IN_FLIGHT

    cpu = ProcessCpu(harness)
    turns: list[tuple[str, float, dict[str, float]]] = []
    for _ in range(rounds):
        for kind, start in starters.items():
            before = cpu.read()
            started = time.monotonic()
            harness.drive(start, chains, inflight=IN_FLIGHT)
            elapsed = time.monotonic() - started
            if kind == "saga":
                harness.wait_audit_caught_up()  # the consumer's share of these sagas' events
            else:
                time.sleep(SETTLE_S)  # the floor's events reach the consumer a moment later
            after = cpu.read()
            steps = chains * CHAIN_LENGTH
            per_step = {
                name: (after[name] - before.get(name, 0.0)) * 1000 / steps for name in after
            }
            turns.append((kind, steps / elapsed, per_step))
    return turns


def table(turns: list[tuple[str, float, dict[str, float]]]) -> str:
    names = sorted({name for _, _, per_step in turns for name, ms in per_step.items() if ms > 0.02})
    header = ["turn", "steps/s", *names, "all"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, rate, per_step in turns:
        cells = [f"{per_step.get(name, 0.0):.2f}" for name in names]
        total = sum(per_step.values())
        lines.append(f"| {kind} | {rate:.0f} | " + " | ".join(cells) + f" | {total:.2f} |")
    return "\n".join(lines)
