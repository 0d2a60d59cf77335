"""Read models for the CLI and the HTTP API: plain dicts, ready for JSON or a table."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from config.settings import Settings
from sagas import rules
from service import repository as repo
from service.db.models import Attempt, Tenant
from service.locks import LockInfo, TenantLocks


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def lock_view(info: LockInfo) -> dict[str, Any]:
    return {
        "held": info.held,
        "holder_run_id": info.run_id,
        "epoch": info.epoch,
        "age_s": info.age_s,
        "ttl_s": info.ttl_s,
    }


def attempt_view(session: Session, attempt: Attempt) -> dict[str, Any]:
    return {
        "attempt_number": attempt.number,
        "attempt_id": attempt.id,
        "trigger": attempt.trigger,
        "state": attempt.state,
        "epoch": attempt.epoch,
        "requested_by": attempt.requested_by,
        "resumed_from": attempt.resumed_from,
        "reused_steps": list(attempt.reused_steps),
        "started_at": _iso(attempt.started_at),
        "ended_at": _iso(attempt.ended_at),
        "failed_step": attempt.failed_step,
        "error_type": attempt.error_type,
        "error_message": attempt.error_message,
        "tries": attempt.tries,
        "retryable": attempt.retryable,
        "repeated_failure": attempt.repeated_failure,
        "steps": [
            {
                "step": run.step,
                "status": run.status,
                "tries": run.tries,
                "duration_ms": run.duration_ms,
                "output": dict(run.output),
                "reused_from_attempt": run.reused_from_attempt,
                "error_type": run.error_type,
                "error_message": run.error_message,
            }
            for run in repo.step_runs_of(session, attempt.id)
        ],
    }


def tenant_summary(tenant: Tenant) -> dict[str, Any]:
    return {
        "tenant_id": tenant.id,
        "slug": tenant.slug,
        "plan": tenant.plan,
        "state": tenant.state,
        "epoch": tenant.epoch,
        "failure_reason": tenant.failure_reason,
        "created_at": _iso(tenant.created_at),
        "updated_at": _iso(tenant.updated_at),
    }


def tenant_detail(
    engine: Engine, locks: TenantLocks, settings: Settings, slug: str
) -> dict[str, Any] | None:
    with Session(engine) as session:
        tenant = repo.tenant_by_slug(session, slug)
        if tenant is None:
            return None
        attempts = repo.attempts_of(session, tenant.id)
        detail = tenant_summary(tenant)
        detail["admin_email"] = tenant.admin_email
        detail["attempts"] = [attempt_view(session, a) for a in attempts]
    last = attempts[-1] if attempts else None
    detail["retries_left"] = rules.retries_left(len(attempts), settings.max_retries)
    detail["max_retries"] = settings.max_retries
    detail["last_failure"] = (
        {
            "step": last.failed_step,
            "error_type": last.error_type,
            "message": last.error_message,
            "tries": last.tries,
            "retryable": last.retryable,
            "repeated_failure": last.repeated_failure,
        }
        if last is not None and last.failed_step
        else None
    )
    detail["admin_console_url"] = (
        settings.console_url_for(tenant.slug) if tenant.state == "active" else None
    )
    detail["lock"] = lock_view(locks.info(slug))
    return detail


def tenant_list(engine: Engine, state: str | None = None) -> list[dict[str, Any]]:
    with Session(engine) as session:
        query = select(Tenant).order_by(col(Tenant.created_at))
        if state:
            query = query.where(Tenant.state == state)
        rows = [tenant_summary(t) for t in session.exec(query).all()]
    return rows
