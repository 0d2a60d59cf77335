"""``python -m bench.compare BEFORE.json AFTER.json``: two runs of the bench side by side, as a
Markdown table (the figures of docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROWS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("bare chain: per-step latency p50 (ms)", ("latency", "bare", "step_p50_ms"), 2),
    ("saga: per-step latency p50 (ms)", ("latency", "saga", "step_p50_ms"), 2),
    ("saga: per-step latency p95 (ms)", ("latency", "saga", "step_p95_ms"), 2),
    ("**per-step latency p50, saga / bare**", ("latency", "ratio", "step_p50_ms"), 2),
    ("hop p50, saga / bare", ("latency", "ratio", "hop_p50_ms"), 2),
    ("bare chain: whole chain p50 (ms)", ("latency", "bare", "chain_p50_ms"), 1),
    ("saga: whole saga p50 (ms)", ("latency", "saga", "chain_p50_ms"), 1),
    ("saga: whole saga p95 (ms)", ("latency", "saga", "chain_p95_ms"), 1),
    ("whole chain p50, saga / bare", ("latency", "ratio", "chain_p50_ms"), 2),
    ("bare chain: steps/s, 8 in flight", ("throughput", "bare", "steps_per_s"), 1),
    ("saga: steps/s, 8 in flight", ("throughput", "saga", "steps_per_s"), 1),
    ("**throughput, saga / bare**", ("throughput", "ratio", "steps_per_s"), 2),
    ("bare chain: worker CPU per step (ms)", ("throughput", "bare", "worker_cpu_ms_per_step"), 2),
    ("saga: worker CPU per step (ms)", ("throughput", "saga", "worker_cpu_ms_per_step"), 2),
    ("floor: per-step latency p50 (ms)", ("latency", "floor", "step_p50_ms"), 2),
    ("per-step latency p50, floor / bare", ("latency", "floor_ratio", "step_p50_ms"), 2),
    ("floor: steps/s, 8 in flight", ("throughput", "floor", "steps_per_s"), 1),
    ("throughput, floor / bare", ("throughput", "floor_ratio", "steps_per_s"), 2),
    ("floor: worker CPU per step (ms)", ("throughput", "floor", "worker_cpu_ms_per_step"), 2),
    ("per-step latency p50, saga / floor", ("latency", "saga_floor_ratio", "step_p50_ms"), 2),
    ("throughput, saga / floor", ("throughput", "saga_floor_ratio", "steps_per_s"), 2),
    ("events produced (ev/s)", ("audit", "production_events_per_s"), 0),
    ("audit consumer drain (ev/s)", ("audit", "consumer_events_per_s"), 0),
    ("**audit consumer / production**", ("audit", "ratio"), 2),
    ("audit lag p50 (ms)", ("audit", "lag_p50_ms"), 1),
    ("audit lag p99 (ms)", ("audit", "lag_p99_ms"), 1),
    ("**retry command -> started p50 (ms)**", ("retry", "started_p50_ms"), 2),
    ("retry command -> started p95 (ms)", ("retry", "started_p95_ms"), 2),
    ("saga worker RSS before (MiB)", ("rss", "before_mb"), 1),
    ("saga worker RSS after (MiB)", ("rss", "after_mb"), 1),
    ("**saga worker RSS growth (%)**", ("rss", "growth_pct"), 2),
)


def _get(results: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = results["summary"]
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return float(node) if isinstance(node, int | float) else None


def table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    lines = ["| measure | " + " | ".join(name for name, _ in runs) + " |"]
    lines.append("|---|" + "---:|" * len(runs))
    for label, path, digits in ROWS:
        cells = []
        for _, results in runs:
            value = _get(results, path)
            cells.append("-" if value is None else f"{value:.{digits}f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare")
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by --json")
    args = parser.parse_args(argv)
    runs = [(path.stem, json.loads(path.read_text())) for path in args.runs]
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
