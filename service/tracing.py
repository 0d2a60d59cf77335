"""OpenTelemetry traces: one trace per provisioning attempt, exported only when asked for.

An attempt's trace id *is* its attempt id (a UUID has the 128 bits of a trace id), and the id of
its root span is derived from it. So every process that touches the attempt lands in the same
trace without carrying anything: the handler that starts it publishes the chain inside the
attempt's context; Celery's instrumentation carries that context from message to message (each
step's ``run`` span is a child of the ``apply_async`` span that sent it, retries and redeliveries
included); and when the attempt ends, the worker that ends it records the root span itself, with
the derived id, from the attempt's start to its end. Given an attempt id from ``provisioner show``,
its trace id is the same hex without hyphens.

Off unless the standard OpenTelemetry variables say otherwise: traces are exported (OTLP over
HTTP/protobuf) only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
is set, and ``OTEL_SDK_DISABLED=true`` turns them off again. Without them every function here is
a cheap no-op. The set-up runs on import (this module is imported by the handlers and the saga
runner, so by every process that starts or runs an attempt, before a worker forks its children:
the SDK's batch exporter restarts its thread in each child).
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from service.dispatch import AttemptRef

log = structlog.get_logger(__name__)

SERVICE_NAME = "tenant-provisioner"
TRACER_NAME = "provisioner"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

# While set, the next span started gets these ids (the root span of an attempt).
_forced_ids: ContextVar[tuple[int, int] | None] = ContextVar("provisioner_forced_ids", default=None)
_configure_lock = threading.Lock()
_configured = False


def trace_id_of(attempt_id: str) -> int:
    """The attempt's trace id: its UUID's 128 bits (a hash, should it not be a UUID)."""
    try:
        value = uuid.UUID(attempt_id).int
    except ValueError:
        value = int.from_bytes(hashlib.sha256(attempt_id.encode()).digest()[:16], "big")
    return value or 1


def root_span_id_of(attempt_id: str) -> int:
    """The id of the attempt's root span, derived from the attempt id (never 0)."""
    digest = hashlib.sha256(f"attempt-root:{attempt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1


def attempt_context(attempt_id: str) -> Context:
    """A context whose current span is the attempt's root (as a remote parent): spans started
    in it join the attempt's trace, in whatever process they run."""
    parent = SpanContext(
        trace_id=trace_id_of(attempt_id),
        span_id=root_span_id_of(attempt_id),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent), Context())


@contextmanager
def in_attempt(attempt_id: str) -> Iterator[Context]:
    """Make the attempt's context current (e.g. while its chain is published)."""
    ctx = attempt_context(attempt_id)
    token = otel_context.attach(ctx)
    try:
        yield ctx
    finally:
        otel_context.detach(token)


def annotate_step(ref: AttemptRef, step: str) -> None:
    """Name the tenant, attempt and step on the current span (the step task's ``run`` span)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(
            {
                "provisioner.slug": ref.slug,
                "provisioner.attempt_number": ref.attempt_number,
                "provisioner.attempt_id": ref.attempt_id,
                "provisioner.step": step,
            }
        )


class AttemptIdGenerator(RandomIdGenerator):
    """Random ids, except for the one span started while ids are forced (an attempt's root)."""

    def generate_trace_id(self) -> int:
        forced = _forced_ids.get()
        return forced[0] if forced else super().generate_trace_id()

    def generate_span_id(self) -> int:
        forced = _forced_ids.get()
        return forced[1] if forced else super().generate_span_id()


def _nanos(when: datetime) -> int:
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return int(aware.timestamp() * 1_000_000_000)


def attempt_ended(
    ref: AttemptRef,
    outcome: str,
    started_at: datetime,
    ended_at: datetime,
    *,
    tracer_provider: TracerProvider | None = None,
) -> None:
    """Record the attempt's root span (``provisioner.attempt``), from its start to its end."""
    provider = tracer_provider or trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider) or not isinstance(
        provider.id_generator, AttemptIdGenerator
    ):
        return  # not ours (or no SDK at all): the steps' spans still share the trace id
    tracer = provider.get_tracer(TRACER_NAME)
    forced = _forced_ids.set((trace_id_of(ref.attempt_id), root_span_id_of(ref.attempt_id)))
    try:
        span = tracer.start_span(
            "provisioner.attempt",
            context=Context(),  # a root: no parent
            kind=SpanKind.INTERNAL,
            start_time=_nanos(started_at),
            attributes={
                "provisioner.slug": ref.slug,
                "provisioner.attempt_number": ref.attempt_number,
                "provisioner.attempt_id": ref.attempt_id,
                "provisioner.outcome": outcome,
            },
        )
    finally:
        _forced_ids.reset(forced)
    span.end(end_time=max(_nanos(ended_at), _nanos(started_at)))


def wanted() -> bool:
    """Whether the standard OpenTelemetry variables ask for traces to be exported."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(os.environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def make_provider(exporter: SpanExporter) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    provider = TracerProvider(
        resource=Resource.create(attributes), id_generator=AttemptIdGenerator()
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def configure() -> bool:
    """Export traces over OTLP and instrument Celery, once per process, if :func:`wanted`."""
    global _configured
    with _configure_lock:
        if _configured or not wanted():
            return _configured
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.instrumentation.celery import CeleryInstrumentor

            provider = make_provider(OTLPSpanExporter())
            trace.set_tracer_provider(provider)
            CeleryInstrumentor().instrument(  # type: ignore[no-untyped-call]
                tracer_provider=provider
            )
        except Exception as exc:  # tracing must never stop the service
            log.warning("tracing.not_configured", error=str(exc)[:300])
            return False
        _configured = True
        log.debug("tracing.configured")
        return True


configure()
