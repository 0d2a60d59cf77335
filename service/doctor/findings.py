"""What every check of the doctor answers with, and how the answers are summed up."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

# How long any one source may take to answer before it is reported as not answering.
TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    ok: bool
    summary: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def healthy(findings: list[Finding]) -> bool:
    return all(f.ok for f in findings)


def as_json(findings: list[Finding]) -> dict[str, Any]:
    return {"healthy": healthy(findings), "checks": [asdict(f) for f in findings]}


def aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def text_of(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def describe(exc: BaseException) -> str:
    """One line, not a page: the first line of the message, shortened."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def age_s(value: datetime | None, now: datetime) -> float | None:
    return None if value is None else round((now - aware(value)).total_seconds(), 1)
