"""The HTTP API as a real process (``python -m service api``) on a free port, and a client."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.environment import free_port
from tests.support.processes import PYTHON, ServiceProcess

API_TOKEN = "test-token-not-secret"


class EnvServiceProcess(ServiceProcess):
    """A ServiceProcess whose environment is ``os.environ`` plus ``env`` (None values: removed),
    for that subprocess only."""

    def __init__(
        self, name: str, args: list[str], log_dir: Path, env: dict[str, str | None]
    ) -> None:
        super().__init__(name, args, log_dir)
        self.env = env

    def environment(self) -> dict[str, str]:
        merged = dict(os.environ)
        for key, value in self.env.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return merged

    def start(self) -> EnvServiceProcess:
        self._terminated = False
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [PYTHON, "-m", "service", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,
        )
        return self


class ApiServer(EnvServiceProcess):
    def __init__(
        self,
        log_dir: Path,
        *,
        token: str | None = API_TOKEN,
        name: str = "api",
        env: dict[str, str | None] | None = None,
    ) -> None:
        self.port = free_port()
        merged: dict[str, str | None] = {
            "PROVISIONER_API_BIND": f"127.0.0.1:{self.port}",
            "PROVISIONER_API_TOKEN": token,
            **(env or {}),
        }
        super().__init__(name, ["api"], log_dir, merged)
        self.token = token

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_up(self, timeout: float = 60.0) -> ApiServer:
        self.wait_ready("Uvicorn running on", timeout)
        return self


def start_api(
    log_dir: Path,
    *,
    token: str | None = API_TOKEN,
    name: str = "api",
    env: dict[str, str | None] | None = None,
) -> ApiServer:
    server = ApiServer(log_dir, token=token, name=name, env=env)
    server.start()
    return server.wait_up()


class Answer:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def call(
    url: str,
    method: str = "GET",
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Answer:
    """One HTTP request; an error status is returned, not raised."""
    assert url.startswith("http://"), url
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return Answer(response.status, response.read(), _lower(response.headers))
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.read(), _lower(error.headers))


def _lower(headers: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def wait_until(predicate: Any, timeout: float, what: str, poll_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
