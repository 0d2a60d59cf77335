"""SQLModel tables. The database is the one writer of truth (design.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def _json_column() -> Any:
    return Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Tenant(SQLModel, table=True):
    __tablename__ = "tenants"

    id: str = Field(primary_key=True, max_length=36)
    slug: str = Field(index=True, max_length=200)
    # The slug while the tenant is not decommissioned, NULL after: unique, so at most one live
    # tenant per slug (both SQLite and PostgreSQL allow many NULLs under a unique constraint).
    live_slug: str | None = Field(default=None, unique=True, max_length=200)
    plan: str = Field(max_length=200)
    admin_email: str | None = Field(default=None, max_length=200)
    state: str = Field(index=True, max_length=20)
    # The fencing epoch: bumped by every run that starts (attempt, decommission) and by reset.
    epoch: int = 0
    failure_reason: str | None = Field(default=None, max_length=40)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Attempt(SQLModel, table=True):
    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("tenant_id", "number", name="uq_attempt_number"),)

    id: str = Field(primary_key=True, max_length=36)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=36)
    number: int
    epoch: int
    trigger: str = Field(max_length=20)
    state: str = Field(max_length=20)
    requested_by: str = Field(default="unknown", max_length=200)
    resumed_from: str = Field(max_length=40)
    reused_steps: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    started_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None
    failed_step: str | None = Field(default=None, max_length=40)
    error_type: str | None = Field(default=None, max_length=200)
    error_message: str | None = Field(default=None, sa_column=Column(Text))
    tries: int | None = None
    retryable: bool | None = None
    repeated_failure: bool | None = None
    lock_token: str | None = Field(default=None, max_length=120)


class StepRun(SQLModel, table=True):
    __tablename__ = "step_runs"
    __table_args__ = (UniqueConstraint("attempt_id", "step", name="uq_step_run"),)

    id: int | None = Field(default=None, primary_key=True)
    attempt_id: str = Field(foreign_key="attempts.id", index=True, max_length=36)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=36)
    step: str = Field(max_length=40)
    status: str = Field(max_length=20)
    tries: int = 0
    # The ids of what the step made; a later retry hands them to ``provider.exists``.
    output: dict[str, Any] = _json_column()
    reused_from_attempt: int | None = None
    started_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None
    duration_ms: int | None = None
    error_type: str | None = Field(default=None, max_length=200)
    error_message: str | None = Field(default=None, sa_column=Column(Text))
    retryable: bool | None = None


class Slot(SQLModel, table=True):
    """The slug's slot (the ``reserve_slot`` provider): unique per slug."""

    __tablename__ = "slots"

    slug: str = Field(primary_key=True, max_length=200)
    tenant_id: str = Field(max_length=36)
    reserved_at: datetime = Field(default_factory=utcnow)


class Decommission(SQLModel, table=True):
    __tablename__ = "decommissions"

    id: str = Field(primary_key=True, max_length=36)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=36)
    epoch: int
    state: str = Field(max_length=20)
    requested_by: str = Field(default="unknown", max_length=200)
    steps: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    started_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None
    failed_step: str | None = Field(default=None, max_length=40)
    error_message: str | None = Field(default=None, sa_column=Column(Text))
    lock_token: str | None = Field(default=None, max_length=120)


class Compensation(SQLModel, table=True):
    """One compensation of one tenant: done once, whichever decommission run did it."""

    __tablename__ = "compensations"
    __table_args__ = (UniqueConstraint("tenant_id", "step", name="uq_compensation"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=36)
    decommission_id: str = Field(foreign_key="decommissions.id", max_length=36)
    step: str = Field(max_length=40)
    status: str = Field(max_length=20)
    tries: int = 0
    started_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None
    error_type: str | None = Field(default=None, max_length=200)
    error_message: str | None = Field(default=None, sa_column=Column(Text))


class OutboxEvent(SQLModel, table=True):
    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_unpublished", "published_at", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(unique=True, max_length=36)
    type: str = Field(max_length=80)
    subject: str | None = Field(default=None, max_length=200)
    body: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    published_at: datetime | None = None


class ProcessedCommand(SQLModel, table=True):
    """A command id acted on (or refused) once: the idempotency key."""

    __tablename__ = "processed_commands"

    command_id: str = Field(primary_key=True, max_length=200)
    type: str = Field(max_length=200)
    slug: str | None = Field(default=None, max_length=200)
    outcome: str = Field(max_length=20)
    reason: str | None = Field(default=None, max_length=40)
    received_at: datetime = Field(default_factory=utcnow)


class DeadLetter(SQLModel, table=True):
    """A message that could not be understood: kept, never dropped."""

    __tablename__ = "dead_letters"

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=40)
    content_type: str | None = Field(default=None, max_length=200)
    # Base64 when the body is not UTF-8, so any bytes survive the round trip.
    body: str = Field(sa_column=Column(Text, nullable=False))
    body_encoding: str = Field(default="utf-8", max_length=10)
    error: str = Field(sa_column=Column(Text, nullable=False))
    received_at: datetime = Field(default_factory=utcnow)


class AuditEvent(SQLModel, table=True):
    """Every event seen on ``tenant.events``, once (unique on the CloudEvent id)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_subject_time", "subject", "seq"),)

    seq: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(unique=True, max_length=200)
    type: str = Field(index=True, max_length=80)
    subject: str | None = Field(default=None, max_length=200)
    tenant_id: str | None = Field(default=None, index=True, max_length=36)
    attempt_number: int | None = None
    time: datetime | None = None
    data: dict[str, Any] = _json_column()
    received_at: datetime = Field(default_factory=utcnow)
