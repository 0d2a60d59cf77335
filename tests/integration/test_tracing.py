"""Issue 7: with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, a real attempt (CLI -> Celery -> a prefork
worker) is exported over OTLP as one trace whose id is the attempt id.

The traced worker and the CLI get a broker of their own (another Redis database), so that the
session's untraced worker cannot take the attempt's tasks; the database and the locks are the
session's.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from sagas.steps import STEPS
from service import tracing
from service.bootstrap import Container
from service.views import tenant_detail
from tests.support.api import EnvServiceProcess, wait_until
from tests.support.environment import REDIS_HOST_URL, claim_redis_db
from tests.support.events import new_slug
from tests.support.processes import PYTHON

pytestmark = pytest.mark.integration


class Collector:
    """A minimal OTLP/HTTP trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.add(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    None,
                )
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex() or None,
                                "service": service,
                                "attributes": {
                                    a.key: a.value.string_value or a.value.int_value
                                    for a in span.attributes
                                },
                            }
                        )

    def of_trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    receiver = Collector()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def traced_env(collector: Collector) -> dict[str, str | None]:
    return {
        "PROVISIONER_BROKER_URL": f"{REDIS_HOST_URL}/{claim_redis_db()}",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "provisioner-tests",
        "PROMETHEUS_MULTIPROC_DIR": None,  # derived again from the data dir
    }


@pytest.fixture(scope="module")
def traced_worker(workdir: Path, traced_env: dict[str, str | None]) -> Iterator[EnvServiceProcess]:
    args = ["worker", "--concurrency", "1", "--hostname", "traced@%h"]
    worker = EnvServiceProcess("worker-traced", args, workdir, traced_env).start()
    worker.wait_ready("ready.")
    yield worker
    worker.stop()


def test_one_attempt_is_one_trace_across_processes(
    services: Container,
    traced_worker: EnvServiceProcess,
    traced_env: dict[str, str | None],
    collector: Collector,
) -> None:
    slug = new_slug("traced")
    cli_env = EnvServiceProcess("cli", [], Path("."), traced_env).environment()
    done = subprocess.run(
        [PYTHON, "-m", "service", "create", slug, "--plan", "pro"],
        env=cli_env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()

    def active() -> dict[str, Any] | None:
        detail = tenant_detail(services.engine, services.locks, services.settings, slug)
        return detail if detail and detail["state"] == "active" else None

    detail = wait_until(active, 60, f"{slug} to be active")
    attempt_id = detail["attempts"][0]["attempt_id"]
    trace_id = attempt_id.replace("-", "")
    root_id = f"{tracing.root_span_id_of(attempt_id):016x}"
    step_spans = {f"run/provisioner.step.{step}" for step in STEPS}

    def whole_trace() -> list[dict[str, Any]]:
        spans = collector.of_trace(trace_id)
        names = {s["name"] for s in spans}
        return spans if step_spans | {"provisioner.attempt"} <= names else []

    spans = wait_until(whole_trace, 30, f"the spans of {slug}'s attempt")
    # Nothing of this attempt went to another trace.
    others = [s for s in collector.spans if s["attributes"].get("provisioner.slug") == slug]
    assert {s["trace_id"] for s in others} == {trace_id}
    by_name = {s["name"]: s for s in spans}
    root = by_name["provisioner.attempt"]
    assert (root["span_id"], root["parent"]) == (root_id, None)
    assert root["attributes"]["provisioner.outcome"] == "completed"
    for step in STEPS:
        span = by_name[f"run/provisioner.step.{step}"]
        assert span["attributes"]["provisioner.slug"] == slug
        assert span["attributes"]["provisioner.attempt_number"] == 1
        assert span["attributes"]["provisioner.step"] == step
        assert span["service"] == "provisioner-tests"
    # The CLI published the first step inside the attempt's context: a child of the root.
    publish = by_name["apply_async/provisioner.step.validate"]
    assert publish["parent"] == root_id
