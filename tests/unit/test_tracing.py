"""One trace per attempt: the context every process derives from the attempt id (in memory)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service import tracing
from service.dispatch import AttemptRef


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=tracing.AttemptIdGenerator())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def ref(number: int = 1) -> AttemptRef:
    return AttemptRef(slug="acme", attempt_number=number, attempt_id=str(uuid.uuid4()))


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


def test_the_trace_id_is_the_attempt_id() -> None:
    attempt_id = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert f"{tracing.trace_id_of(attempt_id):032x}" == attempt_id.replace("-", "")
    assert tracing.root_span_id_of(attempt_id) == tracing.root_span_id_of(attempt_id)
    assert tracing.root_span_id_of(attempt_id) != tracing.root_span_id_of(str(uuid.uuid4()))
    assert 0 < tracing.trace_id_of("not-a-uuid") < 2**128  # hashed, still a valid id


def test_steps_of_one_attempt_share_its_trace_wherever_they_run(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    attempt, other = ref(1), ref(2)
    propagator = TraceContextTextMapPropagator()
    carrier: dict[str, str] = {}
    # The handler publishes the chain inside the attempt's context (headers carry it) ...
    with tracing.in_attempt(attempt.attempt_id), tracer.start_as_current_span("publish"):
        propagator.inject(carrier)
    # ... a worker continues from the headers; another, later, only knows the attempt id.
    with tracer.start_as_current_span("step validate", context=propagator.extract(carrier)):
        pass
    with tracing.in_attempt(attempt.attempt_id), tracer.start_as_current_span("step activate"):
        pass
    with tracing.in_attempt(other.attempt_id), tracer.start_as_current_span("step of another"):
        pass
    started = datetime.now(UTC) - timedelta(seconds=3)
    tracing.attempt_ended(
        attempt, "completed", started, datetime.now(UTC), tracer_provider=provider
    )

    found = by_name(exporter)
    trace_id = tracing.trace_id_of(attempt.attempt_id)
    for name in ("publish", "step validate", "step activate", "provisioner.attempt"):
        assert found[name].context is not None
        assert found[name].context.trace_id == trace_id, name
    assert found["step of another"].context is not None
    assert found["step of another"].context.trace_id == tracing.trace_id_of(other.attempt_id)

    root = found["provisioner.attempt"]
    assert root.parent is None
    assert root.context is not None
    assert root.context.span_id == tracing.root_span_id_of(attempt.attempt_id)
    assert found["publish"].parent is not None
    assert found["publish"].parent.span_id == root.context.span_id
    assert found["step activate"].parent is not None
    assert found["step activate"].parent.span_id == root.context.span_id
    assert root.attributes is not None
    assert root.attributes["provisioner.outcome"] == "completed"
    assert root.start_time is not None
    assert root.end_time is not None
    assert 2.5e9 < root.end_time - root.start_time < 10e9


def test_steps_are_annotated_with_tenant_and_attempt(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    attempt = ref(3)
    with provider.get_tracer("test").start_as_current_span("run/provisioner.step.validate"):
        tracing.annotate_step(attempt, "validate")
    attributes = exporter.get_finished_spans()[0].attributes
    assert attributes is not None
    assert attributes["provisioner.slug"] == "acme"
    assert attributes["provisioner.attempt_number"] == 3
    assert attributes["provisioner.step"] == "validate"


def test_off_unless_the_standard_variables_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*tracing.ENDPOINT_VARIABLES, "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.wanted()
    assert not tracing.configure()  # nothing configured, no error
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    # Without our provider, recording an attempt's end is a no-op.
    tracing.attempt_ended(ref(), "failed", datetime.now(UTC), datetime.now(UTC))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert tracing.wanted()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.wanted()
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing.wanted()
