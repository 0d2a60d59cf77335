"""The HTTP API's request and response bodies (pydantic): what ``/openapi.json`` documents."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sagas.states import TenantState

# Text that reaches the database: no control characters (PostgreSQL refuses NUL in text).
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
NO_NUL = r"^[^\x00]*$"

SLUG_FIELD = Field(
    min_length=1,
    max_length=200,
    pattern=PRINTABLE,
    description=(
        "The tenant's slug. A slug the contract does not allow (`^[a-z][a-z0-9-]{2,62}$`) is "
        "accepted here like on the bus, and fails the saga's `validate` step (not retryable)."
    ),
    examples=["acme"],
)
WHO_FIELD = Field(
    default="api",
    min_length=1,
    max_length=200,
    pattern=PRINTABLE,
    description="Who asks; recorded in the events as `requested_by`.",
)
REASON_FIELD = Field(
    default=None, max_length=2000, pattern=NO_NUL, description="Why, for the record."
)


# --- errors ---
class Problem(BaseModel):
    """Why a request was refused: the contract's rejection `reason` and what to do instead."""

    reason: str = Field(
        description=(
            "A rejection reason of the contract (`malformed`, `unknown_tenant`, `slug_taken`, "
            "`locked`, `not_failed`, `not_retryable`, `retry_cap_reached`, "
            "`already_decommissioned`) or, for access, `unauthorized` / `changes_disabled`."
        ),
        examples=["retry_cap_reached"],
    )
    message: str = Field(description="What went wrong and what to do instead.")
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="For `malformed`: each invalid field and why."
    )


# --- commands ---
class CreateTenant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slug: str = SLUG_FIELD
    plan: str = Field(
        min_length=1,
        max_length=200,
        pattern=PRINTABLE,
        description="`free`, `pro` or `enterprise`; another plan fails `validate`.",
        examples=["pro"],
    )
    admin_email: str | None = Field(
        default=None, max_length=200, pattern=PRINTABLE, examples=["ops@acme.test"]
    )
    requested_by: str = WHO_FIELD


class RetryTenant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(
        default=False,
        description="Retry past the retry cap (`PROVISIONER_MAX_RETRIES`); the other rules hold.",
    )
    reason: str | None = REASON_FIELD
    requested_by: str = WHO_FIELD


class ChangeTenant(BaseModel):
    """The body of reset and decommission (optional)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = REASON_FIELD
    requested_by: str = WHO_FIELD


class Accepted(BaseModel):
    """A command the handlers accepted: the same answer the CLI prints with `--json`."""

    command_id: str = Field(description="The command's idempotency key (`Idempotency-Key`).")
    command_type: str = Field(examples=["tenant.retry_requested"])
    slug: str
    accepted: Literal[True] = True
    duplicate: bool = Field(description="This key was handled before; nothing was done again.")
    event_type: str = Field(description="The first event it caused (empty for a duplicate).")
    message: str
    tenant_id: str | None = None
    attempt_number: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)


# --- reads ---
class Lock(BaseModel):
    held: bool
    holder_run_id: str | None = Field(description="The attempt (or decommission) id holding it.")
    holder_attempt_number: int | None = Field(
        default=None, description="The holder's attempt number, when it is an attempt."
    )
    epoch: int | None
    age_s: float | None
    ttl_s: float | None


class Step(BaseModel):
    step: str
    status: str
    tries: int
    duration_ms: int | None
    output: dict[str, Any]
    reused_from_attempt: int | None
    error_type: str | None
    error_message: str | None


class AttemptView(BaseModel):
    attempt_number: int
    attempt_id: str
    trigger: str
    state: str
    epoch: int
    requested_by: str
    resumed_from: str
    reused_steps: list[str]
    started_at: datetime | None
    ended_at: datetime | None
    failed_step: str | None
    error_type: str | None
    error_message: str | None
    tries: int | None
    retryable: bool | None
    repeated_failure: bool | None
    steps: list[Step]


class LastFailure(BaseModel):
    step: str | None
    error_type: str | None
    message: str | None
    tries: int | None
    retryable: bool | None
    repeated_failure: bool | None


class Action(BaseModel):
    """Whether a command may be sent now, by the contract's rules, and why not."""

    name: Literal["retry", "retry_force", "reset", "decommission"]
    enabled: bool
    why: str = Field(description="Why it is disabled, or what it would do.")


class TenantSummary(BaseModel):
    tenant_id: str
    slug: str
    plan: str
    state: TenantState
    epoch: int
    failure_reason: str | None
    created_at: datetime | None
    updated_at: datetime | None


class TenantDetail(TenantSummary):
    admin_email: str | None
    attempts: list[AttemptView]
    retries_left: int = Field(description="Retries still allowed without `force`.")
    max_retries: int
    last_failure: LastFailure | None = Field(description="The last attempt's failure, if any.")
    admin_console_url: str | None = Field(description="Set once the tenant is active.")
    lock: Lock
    actions: list[Action]


# --- the audit feed (as `provisioner timeline --json` / `diff --json`) ---
class Event(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(description="The CloudEvent id.")
    type: str
    time: datetime | None
    subject: str | None
    tenant_id: str | None
    attempt_number: int | None
    data: dict[str, Any]
    seq: int | None


class TimelineStep(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: str | None
    status: str | None
    retries: int | None = None
    duration_ms: int | None = None
    error_type: str | None = None
    error: str | None = None
    reused_from_attempt: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


class Run(BaseModel):
    """One attempt (`kind` attempt) or one decommission run of a tenant, from the audit store."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["attempt", "decommission"]
    tenant_id: str
    attempt_number: int | None
    outcome: str = Field(description="running, completed, failed or reset.")
    requested_by: str | None = None
    trigger: str | None = None
    resumed_from: str | None = None
    reused_steps: list[str] = Field(default_factory=list)
    started_at: datetime | None
    ended_at: datetime | None
    duration_ms: int | None
    failed_step: str | None = None
    error_type: str | None = None
    error: str | None = None
    retryable: bool | None = None
    repeated_failure: bool | None = None
    steps: list[TimelineStep]
    event_ids: list[str]


class Timeline(BaseModel):
    model_config = ConfigDict(extra="allow")

    slug: str
    runs: list[Run]
    events: list[Event] = Field(description="Every stored event, with its CloudEvent id/type.")


class DiffAttempt(BaseModel):
    model_config = ConfigDict(extra="allow")

    attempt_number: int
    trigger: str | None
    resumed_from: str | None
    outcome: str
    failed_step: str | None
    error_type: str | None
    started_at: datetime | None
    ended_at: datetime | None
    duration_ms: int | None


class DiffStep(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: str
    a: str
    b: str
    a_status: str | None
    b_status: str | None
    reused_from_attempt: int | None
    same: bool


class Diff(BaseModel):
    model_config = ConfigDict(extra="allow")

    slug: str
    tenant_id: str
    a: DiffAttempt
    b: DiffAttempt
    steps: list[DiffStep]
    first_divergence: str | None
    failure_repeated: bool
    reused_steps: dict[str, int | None]
    summary: str
