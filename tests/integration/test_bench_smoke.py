"""Issue 6: the benchmark runs end to end (``python -m bench --smoke``) and reports every measure.

No timing is asserted: the machine is shared. The bench claims its own Redis database and
work directory, and must stop every process it started, even when it is stopped itself.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench import phase_clock
from sagas.steps import STEPS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT_S = 240.0

# Must be numbers > 0; ``hop_*`` (it may round to zero) and ``growth_pct`` (RSS may shrink)
# need only be numbers.
POSITIVE = {
    ("latency", "bare"): ("step_p50_ms", "step_p95_ms", "chain_p50_ms", "chain_p95_ms"),
    ("latency", "saga"): ("step_p50_ms", "step_p95_ms", "chain_p50_ms", "chain_p95_ms"),
    ("latency", "ratio"): ("step_p50_ms", "chain_p50_ms"),
    ("throughput", "bare"): ("steps_per_s", "worker_cpu_ms_per_step"),
    ("throughput", "saga"): ("steps_per_s", "worker_cpu_ms_per_step"),
    ("throughput", "ratio"): ("steps_per_s",),
    ("latency", "floor"): ("step_p50_ms", "chain_p50_ms"),
    ("latency", "floor_ratio"): ("step_p50_ms",),
    ("throughput", "floor"): ("steps_per_s", "worker_cpu_ms_per_step"),
    ("throughput", "floor_ratio"): ("steps_per_s",),
    ("latency", "saga_floor_ratio"): ("step_p50_ms",),
    ("throughput", "saga_floor_ratio"): ("steps_per_s",),
    ("audit",): (
        "production_events_per_s",
        "consumer_events_per_s",
        "ratio",
        "lag_p50_ms",
        "lag_p99_ms",
    ),
    ("retry",): ("started_p50_ms", "started_p95_ms"),
    ("rss",): ("sagas", "before_mb", "after_mb"),
}
NUMBERS = {
    ("latency", "bare"): ("hop_p50_ms", "hop_p95_ms"),
    ("latency", "saga"): ("hop_p50_ms", "hop_p95_ms"),
    ("rss",): ("growth_pct",),
}
TARGETS = 5


def _section(summary: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node: Any = summary
    for part in path:
        node = node[part]
    assert isinstance(node, dict), path
    return node


def _bench_env() -> dict[str, str]:
    """The test session's environment minus its PROVISIONER_* settings: the bench sets its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIONER_")}
    if os.environ.get("TEST_DATABASE_URL"):
        env["BENCH_POSTGRES_URL"] = os.environ["TEST_DATABASE_URL"]
    if os.environ.get("TEST_BROKER_URL", "").startswith("amqp"):
        env["BENCH_RABBITMQ_URL"] = os.environ["TEST_BROKER_URL"]
    return env


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM first (the bench stops its workers), then kill whatever is left of its tree."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue


def _run(args: list[str], what: str) -> str:
    """Run a bench command from the project's root; its output, once it has exited 0."""
    process = subprocess.Popen(
        args,
        cwd=ROOT,
        env=_bench_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        output, _ = process.communicate(timeout=SMOKE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop(process)
        pytest.fail(f"the {what} did not finish in {SMOKE_TIMEOUT_S:.0f}s")
    finally:
        _stop(process)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-4000:]
    return text


def test_smoke_bench_writes_every_measure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [sys.executable, "-m", "bench", "--smoke", "--json", str(out)]
    args += ["--workdir", str(tmp_path / "work")]
    if os.environ.get("TEST_DATABASE_URL"):
        args.append("--postgres")
    if os.environ.get("TEST_BROKER_URL", "").startswith("amqp"):
        args.append("--rabbitmq")
    text = _run(args, "smoke bench")
    assert "saga/bare" in text, text[-2000:]
    assert "floor/bare" in text, text[-2000:]

    results = json.loads(out.read_text())
    assert results["config"]["smoke"] is True
    assert results["config"]["database"] == (
        "postgresql" if os.environ.get("TEST_DATABASE_URL") else "sqlite"
    )
    summary = results["summary"]
    for path, keys in POSITIVE.items():
        section = _section(summary, path)
        for key in keys:
            value = section[key]
            assert isinstance(value, int | float), (path, key, value)
            assert math.isfinite(value), (path, key, value)
            assert value > 0, (path, key, value)
    for path, keys in NUMBERS.items():
        section = _section(summary, path)
        for key in keys:
            assert isinstance(section[key], int | float), (path, key, section[key])
    assert len(results["targets"]) == TARGETS
    for target in results["targets"]:
        assert {"name", "value", "op", "limit", "pass"} <= set(target)
        assert isinstance(target["pass"], bool)
    assert len(results["repeats"]) == 1
    # Nothing the bench started is left running (its processes carry its work directory).
    assert not _processes_under(tmp_path / "work")


def _processes_under(workdir: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            timing_dir = proc.environ().get("BENCH_TIMING_DIR", "")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if timing_dir.startswith(str(workdir)):
            found.append(proc.pid)
    return found


def test_cpu_by_process_gives_each_kind_its_workers_share() -> None:
    # `python -m bench.profile --by-process` (SQLite and Redis whatever the session's backends).
    args = [sys.executable, "-m", "bench.profile", "--by-process", "--sagas", "8", "--rounds", "1"]
    text = _run(args, "CPU-by-process run")
    rows = [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    header, body = rows[0], {row[0]: dict(zip(rows[0], row, strict=True)) for row in rows[1:]}
    assert header[:2] == ["turn", "steps/s"], header
    assert header[-1] == "all", header
    assert set(body) == {"bare", "floor", "saga"}, text[-2000:]
    for kind, worker in (
        ("bare", "bare-worker"),
        ("floor", "bare-worker"),
        ("saga", "saga-worker"),
    ):
        row = body[kind]
        assert float(row["steps/s"]) > 0, row
        # CPU is read in clock ticks: the pool of the worker that ran the chains spent some.
        assert float(row[f"{worker}: pool"]) > 0, row
        assert float(row["all"]) >= float(row[f"{worker}: pool"]), row


def test_in_process_measure_runs_every_step_of_each_saga(tmp_path: Path) -> None:
    # `python -m bench.profile --in-process` (SQLite and Redis whatever the session's backends).
    out = tmp_path / "in-process.json"
    args = [sys.executable, "-m", "bench.profile", "--in-process", "--sagas", "3"]
    text = _run([*args, "--json", str(out)], "in-process measure")
    measured = json.loads(out.read_text())
    assert measured["sagas"] == 3, text[-2000:]
    assert measured["steps"] == 3 * len(STEPS), measured
    for key in ("creation_cpu_ms", "step_cpu_ms", "step_wall_ms"):
        assert isinstance(measured[key], float), measured
        assert measured[key] > 0, measured


def test_rounds_write_every_ratio(tmp_path: Path) -> None:
    """``python -m bench.rounds``, which compares two trees by many short rounds, runs too."""
    out = tmp_path / "rounds.json"
    args = [sys.executable, "-m", "bench.rounds", "--rounds", "2", "--sagas", "2"]
    text = _run([*args, "--json", str(out)], "rounds")
    assert "latency_saga_bare" in text, text[-2000:]
    results = json.loads(out.read_text())
    assert len(results["rounds"]) == 2
    for one in results["rounds"]:
        assert set(one["step_p50_ms"]) == {"bare", "floor", "saga"}
        assert all(value > 0 for value in one["steps_per_s"].values())
    for key, value in results["medians"].items():
        assert math.isfinite(value), key
        assert value > 0, key


def test_phases_time_each_workers_steps_on_its_thread_clock(tmp_path: Path) -> None:
    """``python -m bench.profile --phases``: the pool's CPU per step by phase, bare and saga."""
    out = tmp_path / "phases.json"
    args = [sys.executable, "-m", "bench.profile", "--phases", "--sagas", "4"]
    text = _run([*args, "--json", str(out)], "phases")
    found = json.loads(out.read_text())
    saga, bare = found["saga"], found["bare"]
    task, body = saga[phase_clock.TASK_PHASE], saga["  the step's body"]
    assert task["calls"] == 1.0, text[-2000:]
    assert body["calls"] == 1.0, saga
    # Phases nest on one thread clock: a step's body within its task, its completion within it.
    assert 0 < saga["    completion transaction"]["ms"] <= body["ms"] <= task["ms"], saga
    # Seven of a chain's eight steps send a next step; the bare chain's tasks have no body.
    assert saga["  sending the next step (Celery)"]["calls"] == 7 / 8, saga
    assert bare[phase_clock.TASK_PHASE]["ms"] > 0, bare
    assert "  the step's body" not in bare, bare


def test_phases_on_the_wall_clock_time_one_chain_at_a_time(tmp_path: Path) -> None:
    """``--phases --wall``: the same phases on the wall clock; a process's CPU is not among them."""
    out = tmp_path / "wall.json"
    args = [sys.executable, "-m", "bench.profile", "--phases", "--wall", "--sagas", "2"]
    text = _run([*args, "--json", str(out)], "wall-clock phases")
    assert "1 in flight" in text, text[-2000:]
    saga = json.loads(out.read_text())["saga"]
    assert phase_clock.PROCESS_PHASE not in saga, saga
    # A step's body waits on Redis and SQLite: on the wall clock it holds its round trip too.
    assert 0 < saga["    lock + fault plan (Redis)"]["ms"] <= saga["  the step's body"]["ms"], saga
