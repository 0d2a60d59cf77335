"""Medians over the repeats, the saga / bare-chain ratios, the targets, the table and the JSON."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.stats import median, ratio

Repeat = dict[str, Any]

LATENCY_KEYS = (
    "step_p50_ms",
    "step_p95_ms",
    "hop_p50_ms",
    "hop_p95_ms",
    "chain_p50_ms",
    "chain_p95_ms",
)
THROUGHPUT_KEYS = ("steps_per_s", "worker_cpu_ms_per_step", "step_p50_ms", "chain_p50_ms")


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    path: tuple[str, ...]
    op: str  # "<=" or ">="
    limit: float
    per_repeat: str | None = None  # key of summary["per_repeat"]: the value in each repeat

    def value(self, summary: dict[str, Any]) -> float:
        node: Any = summary
        for part in self.path:
            node = node[part]
        return float(node)

    def check(self, summary: dict[str, Any]) -> dict[str, Any]:
        value = self.value(summary)
        compare: Callable[[float, float], bool] = operator.le if self.op == "<=" else operator.ge
        passed = not math.isnan(value) and compare(value, self.limit)
        repeats = summary.get("per_repeat", {}).get(self.per_repeat) if self.per_repeat else None
        return {
            "name": self.name,
            "value": value,
            "op": self.op,
            "limit": self.limit,
            "pass": passed,
            "repeats": repeats,
        }


TARGETS = (
    Target(
        "per-step latency p50, saga / bare",
        ("latency", "ratio", "step_p50_ms"),
        "<=",
        1.3,
        "step_ratio",
    ),
    Target(
        "throughput (8 in flight), saga / bare",
        ("throughput", "ratio", "steps_per_s"),
        ">=",
        0.8,
        "throughput_ratio",
    ),
    Target("audit consumer / production rate", ("audit", "ratio"), ">=", 2.0, "audit_ratio"),
    Target(
        "retry command -> started p50 (ms)",
        ("retry", "started_p50_ms"),
        "<=",
        20.0,
        "retry_p50_ms",
    ),
    Target("saga worker RSS growth (%)", ("rss", "growth_pct"), "<=", 10.0),
)


def _medians(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys() if rows else []
    return {key: median([row[key] for row in rows]) for key in keys}


def _ratios(
    repeats: list[Repeat], section: str, keys: tuple[str, ...], kind: str = "saga"
) -> dict[str, float]:
    """Per repeat ``kind`` / bare (measured seconds apart), then the median of those."""
    return {
        key: median([ratio(r[section][kind][key], r[section]["bare"][key]) for r in repeats])
        for key in keys
    }


def _with_floor(repeats: list[Repeat], section: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The bare chain, the saga, their ratio, and the floor with its ratios to the bare chain and
    from the saga (runs from before the floor existed have none)."""
    out: dict[str, Any] = {
        "bare": _medians([r[section]["bare"] for r in repeats]),
        "saga": _medians([r[section]["saga"] for r in repeats]),
        "ratio": _ratios(repeats, section, keys),
    }
    if all("floor" in r[section] for r in repeats):
        out["floor"] = _medians([r[section]["floor"] for r in repeats])
        out["floor_ratio"] = _ratios(repeats, section, keys, "floor")
        # What the saga's own machinery costs: per repeat, as the other ratios.
        out["saga_floor_ratio"] = {
            key: median([ratio(r[section]["saga"][key], r[section]["floor"][key]) for r in repeats])
            for key in keys
        }
    return out


def summarise(repeats: list[Repeat], rss: dict[str, float]) -> dict[str, Any]:
    audit = _medians([r["audit"] for r in repeats])
    audit["production_events_per_s"] = median(
        [r["throughput"]["saga"]["production_events_per_s"] for r in repeats]
    )
    audit_ratios = [
        ratio(
            r["audit"]["consumer_events_per_s"], r["throughput"]["saga"]["production_events_per_s"]
        )
        for r in repeats
    ]
    audit["ratio"] = median(audit_ratios)
    per_repeat = {
        "step_ratio": [
            ratio(r["latency"]["saga"]["step_p50_ms"], r["latency"]["bare"]["step_p50_ms"])
            for r in repeats
        ],
        "throughput_ratio": [
            ratio(r["throughput"]["saga"]["steps_per_s"], r["throughput"]["bare"]["steps_per_s"])
            for r in repeats
        ],
        "audit_ratio": audit_ratios,
        "retry_p50_ms": [r["retry"]["started_p50_ms"] for r in repeats],
    }
    return {
        "latency": _with_floor(repeats, "latency", LATENCY_KEYS),
        "throughput": _with_floor(repeats, "throughput", THROUGHPUT_KEYS),
        "audit": audit,
        "retry": _medians([r["retry"] for r in repeats]),
        "rss": rss,
        "per_repeat": per_repeat,
    }


def check_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [target.check(summary) for target in TARGETS]


def _f(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def render(summary: dict[str, Any], targets: list[dict[str, Any]], *, asserted: bool) -> str:
    lat, tp = summary["latency"], summary["throughput"]
    audit, retry, rss = summary["audit"], summary["retry"], summary["rss"]
    rows: list[tuple[str, str, str, str]] = []

    def pair(label: str, section: dict[str, Any], key: str, digits: int = 2) -> None:
        rows.append(
            (
                label,
                _f(section["bare"][key], digits),
                _f(section["saga"][key], digits),
                _f(section["ratio"][key]),
            )
        )

    pair("per-step latency p50 (ms, start to start)", lat, "step_p50_ms")
    pair("per-step latency p95 (ms)", lat, "step_p95_ms")
    pair("hop p50 (ms, end of a step to next start)", lat, "hop_p50_ms")
    pair("hop p95 (ms)", lat, "hop_p95_ms")
    pair("whole chain p50 (ms, sent to last end)", lat, "chain_p50_ms", 1)
    pair("whole chain p95 (ms)", lat, "chain_p95_ms", 1)
    pair("throughput, 8 in flight (steps/s)", tp, "steps_per_s", 1)
    pair("worker CPU per step (ms)", tp, "worker_cpu_ms_per_step")
    rows.append(
        (
            "events produced (ev/s, saga at 8 in flight)",
            "",
            _f(audit["production_events_per_s"], 0),
            "",
        )
    )
    rows.append(
        (
            "audit consumer drain (ev/s)",
            "",
            _f(audit["consumer_events_per_s"], 0),
            _f(audit["ratio"]),
        )
    )
    rows.append(
        (
            "audit lag p50 / p99 (ms)",
            "",
            f"{_f(audit['lag_p50_ms'], 1)} / {_f(audit['lag_p99_ms'], 1)}",
            "",
        )
    )
    rows.append(
        (
            "retry command -> started p50 / p95 (ms)",
            "",
            f"{_f(retry['started_p50_ms'])} / {_f(retry['started_p95_ms'])}",
            "",
        )
    )
    rows.append(
        (
            f"saga worker RSS before / after {int(rss['sagas'])} sagas (MiB)",
            "",
            f"{_f(rss['before_mb'], 1)} / {_f(rss['after_mb'], 1)}",
            f"{_f(rss['growth_pct'], 1)} %",
        )
    )
    width = max(len(row[0]) for row in rows)
    lines = [f"{'measure':<{width}}  {'bare chain':>11}  {'saga':>17}  {'saga/bare':>9}"]
    lines.append("-" * len(lines[0]))
    lines += [f"{a:<{width}}  {b:>11}  {c:>17}  {d:>9}" for a, b, c, d in rows]
    lines += _floor_lines(lat, tp)
    lines.append("")
    heading = "targets" if asserted else "targets (smoke run: shown, not asserted)"
    lines.append(heading)
    for t in targets:
        verdict = "PASS" if t["pass"] else "MISS"
        each = t.get("repeats") or []
        spread = f"; repeats {', '.join(_f(v) for v in each)}" if len(each) > 1 else ""
        lines.append(
            f"  {verdict}  {t['name']}: {_f(t['value'])} (target {t['op']} {_f(t['limit'])}"
            f"{spread})"
        )
    return "\n".join(lines)


def _floor_lines(lat: dict[str, Any], tp: dict[str, Any]) -> list[str]:
    """The floor beside the bare chain: what the targets leave for the rest of a step."""
    if "floor" not in lat or "floor" not in tp:
        return []
    rows = [
        ("per-step latency p50 (ms)", lat, "step_p50_ms", 2),
        ("whole chain p50 (ms)", lat, "chain_p50_ms", 1),
        ("throughput, 8 in flight (steps/s)", tp, "steps_per_s", 1),
        ("worker CPU per step (ms)", tp, "worker_cpu_ms_per_step", 2),
    ]
    width = max(len(row[0]) for row in rows)
    lines = [
        "",
        "the floor: the bare chain's tasks plus one commit and two audited events each",
        f"{'measure':<{width}}  {'bare chain':>11}  {'floor':>17}  {'floor/bare':>10}"
        f"  {'saga/floor':>10}",
    ]
    for label, section, key, digits in rows:
        saga_floor = section.get("saga_floor_ratio", {}).get(key)
        lines.append(
            f"{label:<{width}}  {_f(section['bare'][key], digits):>11}  "
            f"{_f(section['floor'][key], digits):>17}  {_f(section['floor_ratio'][key]):>10}"
            f"  {'-' if saga_floor is None else _f(saga_floor):>10}"
        )
    return lines
