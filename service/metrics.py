"""Prometheus metrics, added up across processes by prometheus_client's multiprocess mode.

Counters and histograms are recorded where things happen: the handlers (in the API, the command
listener and the CLI) count attempts started and commands refused; the saga runner (in every
prefork child of every worker) times steps and counts failures. Each process writes its values to
its own file under ``PROMETHEUS_MULTIPROC_DIR``; ``/metrics`` on the API adds the files up and
computes the gauges that describe *now* (locks held, outbox backlog, audit lag) at scrape time.

prometheus_client picks its value store when a metric's value is first created, so the directory
must be in the environment before that: this module sets it on import, before it imports
prometheus_client, to ``<PROVISIONER_DATA_DIR>/metrics`` (made absolute, so children with another
working directory agree) unless the operator set it. Every process that records a metric imports
this module through the handlers or the saga runner. Counters survive restarts in those files;
delete the directory while the service is stopped to start from zero.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ParamSpec

import structlog

from config.settings import ENV_PREFIX, Settings

P = ParamSpec("P")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _data_dir() -> Path:
    # Not get_settings(): a bad setting must reach the CLI's one-line error, not fail an import.
    raw = os.environ.get(f"{ENV_PREFIX}DATA_DIR")
    default = Settings.model_fields["data_dir"].default
    return Path(raw) if raw else Path(default)


def _multiproc_dir() -> str:
    """``PROMETHEUS_MULTIPROC_DIR``, set to ``<data_dir>/metrics`` unless the operator set it.

    Only the variable, now: the directory is made when a first value is recorded, so that
    ``provisioner --help`` creates nothing.
    """
    configured = os.environ.get(MULTIPROC_ENV)
    path = configured or str((_data_dir() / "metrics").absolute())
    os.environ[MULTIPROC_ENV] = path
    return path


# A process that imported prometheus_client before this module (Flower does, for its own metrics)
# keeps its metrics in memory: the variable set now reaches only its children.
MULTIPROC_DIR = _multiproc_dir()
_MULTIPROCESS = "prometheus_client" not in sys.modules
log = structlog.get_logger(__name__)
_warned = False


_dir_made = False


def _ensure_dir() -> None:
    # Once per process (a stat per recorded value was 1 % of a step); a failure tries again.
    global _dir_made
    if not _dir_made:
        Path(MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)
        _dir_made = True


def _never_fails(record: Callable[P, None]) -> Callable[P, None]:
    """Metrics must never break a command or a step: a failure to record is logged once."""

    @functools.wraps(record)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        global _warned
        try:
            _ensure_dir()
            record(*args, **kwargs)
        except Exception as exc:
            if not _warned:
                _warned = True
                log.warning("metrics.not_recorded", directory=MULTIPROC_DIR, error=str(exc)[:300])

    return guarded


from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

ATTEMPTS_STARTED = Counter(
    "provisioner_attempts_started",
    "Provisioning attempts started, by trigger (create or retry).",
    ["trigger"],
)
ATTEMPTS_ENDED = Counter(
    "provisioner_attempts_ended",
    "Provisioning attempts ended, by outcome (completed, failed or reset).",
    ["outcome"],
)
STEP_DURATION = Histogram(
    "provisioner_step_duration_seconds",
    "Time a saga step's provider took to complete, by step (completed steps only).",
    ["step"],
    buckets=STEP_BUCKETS,
)
STEP_FAILURES = Counter(
    "provisioner_step_failures",
    "Steps that failed their attempt (after their automatic tries), by step and error type.",
    ["step", "error_type"],
)
STEP_RETRIES = Counter(
    "provisioner_step_retries",
    "Automatic retries of a step inside an attempt (step_retrying), by step and error type.",
    ["step", "error_type"],
)
REPEATED_FAILURES = Counter(
    "provisioner_repeated_failures",
    "Failed attempts that failed at the same step with the same error type as the previous one.",
    ["step"],
)
RETRIES_REFUSED = Counter(
    "provisioner_retries_refused",
    "Retry commands refused, by the contract's reason (retry_cap_reached, locked, ...).",
    ["reason"],
)
COMMANDS_REJECTED = Counter(
    "provisioner_commands_rejected",
    "Commands refused (every type), by command type and reason.",
    ["command_type", "reason"],
)
AUDIT_LAG = Histogram(
    "provisioner_audit_event_lag_seconds",
    "How long after its CloudEvent time an event reached the audit store.",
    ["queue"],
    buckets=LAG_BUCKETS,
)

RETRY_COMMAND = "tenant.retry_requested"


# --- what the handlers and the saga runner call (one line each) ---
@_never_fails
def attempt_started(trigger: str) -> None:
    ATTEMPTS_STARTED.labels(trigger=trigger).inc()


@_never_fails
def attempt_ended(outcome: str) -> None:
    ATTEMPTS_ENDED.labels(outcome=outcome).inc()


@_never_fails
def attempt_reset(reset_attempt: int | None) -> None:
    """A reset ends the running attempt, if there was one (None: nothing was running)."""
    if reset_attempt is not None:
        attempt_ended("reset")


@_never_fails
def attempt_failed(step: str, error_type: str, repeated: bool) -> None:
    attempt_ended("failed")
    STEP_FAILURES.labels(step=step, error_type=error_type).inc()
    if repeated:
        REPEATED_FAILURES.labels(step=step).inc()


@_never_fails
def step_completed(step: str, elapsed_s: float) -> None:
    STEP_DURATION.labels(step=step).observe(elapsed_s)


@_never_fails
def step_retrying(step: str, error_type: str) -> None:
    STEP_RETRIES.labels(step=step, error_type=error_type).inc()


@_never_fails
def command_rejected(command_type: str, reason: str) -> None:
    COMMANDS_REJECTED.labels(command_type=command_type, reason=reason).inc()
    if command_type == RETRY_COMMAND:
        RETRIES_REFUSED.labels(reason=reason).inc()


@_never_fails
def record_audit_lag(seconds: float, queue: str = "provisioner.audit") -> None:
    """For the audit consumer: how late a stored event was (now - its CloudEvent time)."""
    AUDIT_LAG.labels(queue=queue).observe(max(0.0, seconds))


def exposition(*collectors: Collector) -> tuple[bytes, str]:
    """The text ``/metrics`` serves: every process's counters plus ``collectors`` (gauges
    computed at scrape time), and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    try:
        _ensure_dir()
    except OSError as exc:
        log.warning("metrics.no_directory", directory=MULTIPROC_DIR, error=str(exc)[:300])
    if _MULTIPROCESS and Path(MULTIPROC_DIR).is_dir():
        MultiProcessCollector(registry, path=MULTIPROC_DIR)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ThisProcess())
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _ThisProcess(Collector):
    def collect(self) -> Iterable[Metric]:
        from prometheus_client import REGISTRY

        return REGISTRY.collect()
