"""Read models over the audit store: a tenant's timeline and the diff of two attempts.

Built from ``audit_events`` only (what was published), so they answer for decommissioned
tenants too. Events are keyed by subject (the slug); a slug reused after a decommission belongs
to a new tenant (a new ``tenant_id``), so runs are grouped by tenant, newest tenant last.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from sagas.messages import EventType
from sagas.steps import STEPS
from service.db.models import AuditEvent

Run = dict[str, Any]
ATTEMPT_END = {
    EventType.COMPLETED.value: "completed",
    EventType.FAILED.value: "failed",
    EventType.RESET.value: "reset",
}
DECOMMISSION_END = {
    EventType.DECOMMISSION_COMPLETED.value: "completed",
    EventType.DECOMMISSION_FAILED.value: "failed",
}


class FeedError(LookupError):
    """The audit store has nothing to answer with (no such tenant, attempt, or pair)."""


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _ms(start: Any, end: Any) -> int | None:
    return int((end - start).total_seconds() * 1000) if start and end else None


def event_view(row: AuditEvent) -> dict[str, Any]:
    return {
        "id": row.event_id,
        "type": row.type,
        "time": _iso(row.time),
        "subject": row.subject,
        "tenant_id": row.tenant_id,
        "attempt_number": row.attempt_number,
        "data": row.data,
        "seq": row.seq,
    }


def _rows(engine: Engine, slug: str) -> list[AuditEvent]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(AuditEvent)
                .where(AuditEvent.subject == slug)
                .order_by(col(AuditEvent.time), col(AuditEvent.seq))
            ).all()
        )


def all_events(engine: Engine, slug: str) -> list[dict[str, Any]]:
    """Every stored event of the slug, in the order they happened (for ``timeline --json``)."""
    return [event_view(row) for row in _rows(engine, slug)]


def tenant_ids(rows: list[AuditEvent]) -> list[str]:
    """The tenants that held the slug, in the order they first appear (newest last)."""
    seen: dict[str, None] = {}
    for row in rows:
        if row.tenant_id:
            seen.setdefault(row.tenant_id, None)
    return list(seen)


def _new_step(step: str) -> dict[str, Any]:
    fields = ("duration_ms", "error_type", "error", "reused_from_attempt", "started_at", "ended_at")
    return {"step": step, "status": None, "retries": 0, **dict.fromkeys(fields)}


def _new_attempt(tenant_id: str, number: int) -> Run:
    failure = ("failed_step", "error_type", "error", "retryable", "repeated_failure")
    return {
        "kind": "attempt",
        "tenant_id": tenant_id,
        "attempt_number": number,
        **dict.fromkeys(("trigger", "requested_by", "resumed_from")),
        "reused_steps": [],
        **dict.fromkeys(("started_at", "ended_at")),
        "outcome": "running",
        "duration_ms": None,
        **dict.fromkeys(failure),
        "steps": {},
        "event_ids": [],
    }


def _apply_attempt_event(run: Run, row: AuditEvent) -> None:
    data, kind = row.data, row.type.removeprefix("tenant.provisioning.")
    run["event_ids"].append(row.event_id)
    if kind == "started":
        run["started_at"] = row.time
        for key in ("trigger", "requested_by", "resumed_from"):
            run[key] = data.get(key)
        run["reused_steps"] = list(data.get("reused_steps") or [])
    elif row.type in ATTEMPT_END:
        run["outcome"], run["ended_at"] = ATTEMPT_END[row.type], row.time
        run["duration_ms"] = data.get("duration_ms") or _ms(run["started_at"], row.time)
        if kind == "failed":
            _apply_failure(run, row)
    elif isinstance(name := data.get("step"), str):
        step = run["steps"].setdefault(name, _new_step(name))
        if kind == "step_started":
            step["started_at"] = row.time
            step["status"] = step["status"] or "started"
        elif kind == "step_retrying":
            step["status"], step["error"] = "retrying", data.get("error")
            step["retries"] = max(step["retries"] + 1, int(data.get("try") or 0))
        elif kind == "step_completed":
            step.update(status="completed", ended_at=row.time, duration_ms=data.get("duration_ms"))
        elif kind == "step_skipped":
            step.update(status="skipped", reused_from_attempt=data.get("reused_from_attempt"))


def _apply_failure(run: Run, row: AuditEvent) -> None:
    data = row.data
    details = data.get("details") or {}
    name = str(data.get("failed_activity"))
    step = run["steps"].setdefault(name, _new_step(name))
    step.update(status="failed", ended_at=row.time, error_type=details.get("error_type"))
    step["error"] = f"{details.get('error_type')}: {details.get('message')}"
    step["duration_ms"] = _ms(step["started_at"], row.time)
    run.update(failed_step=name, error_type=step["error_type"], error=step["error"])
    run["retryable"] = data.get("retryable")
    run["repeated_failure"] = data.get("repeated_failure")


def _new_decommission(tenant_id: str, row: AuditEvent) -> Run:
    return {
        "kind": "decommission",
        "tenant_id": tenant_id,
        "attempt_number": None,
        "requested_by": row.data.get("requested_by"),
        "started_at": row.time,
        "ended_at": None,
        "outcome": "running",
        "duration_ms": None,
        "steps": [],
        "event_ids": [],
    }


def _apply_decommission_event(run: Run, row: AuditEvent) -> None:
    run["event_ids"].append(row.event_id)
    step, error = row.data.get("step"), row.data.get("error")
    if row.type == EventType.DECOMMISSION_STEP_COMPLETED.value:
        run["steps"].append({"step": step, "status": "completed", "error": None})
    elif row.type == EventType.DECOMMISSION_FAILED.value and step:
        run["steps"].append({"step": step, "status": "failed", "error": error})
    if row.type in DECOMMISSION_END:
        run["outcome"], run["ended_at"] = DECOMMISSION_END[row.type], row.time
        run["duration_ms"] = _ms(run["started_at"], row.time)


def _runs_of(tenant_id: str, rows: list[AuditEvent]) -> list[Run]:
    attempts: dict[int, Run] = {}
    decommissions: list[Run] = []
    for row in rows:
        if row.type.startswith("tenant.provisioning.") and row.attempt_number is not None:
            number = row.attempt_number
            _apply_attempt_event(attempts.setdefault(number, _new_attempt(tenant_id, number)), row)
        elif row.type.startswith("tenant.decommission."):
            if row.type == EventType.DECOMMISSION_STARTED.value or not decommissions:
                decommissions.append(_new_decommission(tenant_id, row))
            _apply_decommission_event(decommissions[-1], row)
    order = {step: i for i, step in enumerate(STEPS)}
    for run in attempts.values():
        run["steps"] = sorted(run["steps"].values(), key=lambda s: order.get(s["step"], len(STEPS)))
        for step in run["steps"]:
            step["started_at"], step["ended_at"] = _iso(step["started_at"]), _iso(step["ended_at"])
    runs = sorted(
        [*attempts.values(), *decommissions],
        key=lambda r: (r["started_at"] is None, r["started_at"] or 0, r["attempt_number"] or 0),
    )
    for run in runs:
        run["started_at"], run["ended_at"] = _iso(run["started_at"]), _iso(run["ended_at"])
    return runs


def timeline(
    engine: Engine, slug: str, attempt: int | None = None, tenant_id: str | None = None
) -> list[Run]:
    """The slug's runs (attempts and decommissions), tenant by tenant, newest tenant last.

    With ``attempt``, only that attempt of ``tenant_id`` (default: the newest tenant).
    """
    rows = _rows(engine, slug)
    tenants = tenant_ids(rows)
    if attempt is not None or tenant_id is not None:
        tenants = [tenant_id or (tenants[-1] if tenants else "")]
    runs: list[Run] = []
    for tenant in tenants:
        runs.extend(_runs_of(tenant, [row for row in rows if row.tenant_id == tenant]))
    if attempt is not None:
        runs = [r for r in runs if r["kind"] == "attempt" and r["attempt_number"] == attempt]
    return runs


def describe_step(step: dict[str, Any] | None) -> str:
    """One step of one attempt, in words."""
    if step is None or step["status"] is None:
        return "not run"
    retried = f" after {step['retries']} retries" if step["retries"] else ""
    if step["status"] == "skipped":
        return f"skipped (reused from attempt {step['reused_from_attempt']})"
    if step["status"] == "failed":
        return f"failed with {step['error_type']}{retried}"
    if step["status"] == "retrying":
        return f"retrying ({step['retries']} so far)"
    return f"{step['status']}{retried}"


def _effect(step: dict[str, Any] | None) -> tuple[str, str | None]:
    """What a step left behind: a reused result counts as done, like a completed one."""
    if step is None or step["status"] is None:
        return ("not run", None)
    if step["status"] in ("completed", "skipped"):
        return ("done", None)
    return (step["status"], step["error_type"])


def diff(engine: Engine, slug: str, a: int | None = None, b: int | None = None) -> dict[str, Any]:
    """Step by step, what attempts ``a`` and ``b`` of the newest tenant did (default: the last
    two), the first step where they diverge, and whether the failure repeated."""
    tenants = tenant_ids(_rows(engine, slug))
    runs = timeline(engine, slug, tenant_id=tenants[-1]) if tenants else []
    attempts = {r["attempt_number"]: r for r in runs if r["kind"] == "attempt"}
    if (a is None) != (b is None):
        raise ValueError("give both attempts to compare, or neither")
    if a is None or b is None:
        numbers = sorted(attempts)
        if len(numbers) < 2:
            raise FeedError(f"{slug!r} has {len(numbers)} attempt(s) on record; nothing to compare")
        a, b = numbers[-2], numbers[-1]
    missing = [n for n in (a, b) if n not in attempts]
    if missing:
        raise FeedError(f"no attempt {missing[0]} of {slug!r} in the audit store")
    run_a, run_b = attempts[a], attempts[b]
    by_a = {s["step"]: s for s in run_a["steps"]}
    by_b = {s["step"]: s for s in run_b["steps"]}
    names = [s for s in STEPS if s in by_a or s in by_b]
    names += [s for s in {**by_a, **by_b} if s not in names]
    steps: list[dict[str, Any]] = []
    for name in names:
        sa, sb = by_a.get(name), by_b.get(name)
        steps.append(
            {
                "step": name,
                "a": describe_step(sa),
                "b": describe_step(sb),
                "a_status": sa["status"] if sa else None,
                "b_status": sb["status"] if sb else None,
                "reused_from_attempt": sb["reused_from_attempt"] if sb else None,
                "same": _effect(sa) == _effect(sb),
            }
        )
    first = next((s["step"] for s in steps if not s["same"]), None)
    repeated = run_a["outcome"] == run_b["outcome"] == "failed" and (
        run_a["failed_step"],
        run_a["error_type"],
    ) == (run_b["failed_step"], run_b["error_type"])
    reused = {s["step"]: s["reused_from_attempt"] for s in steps if s["b_status"] == "skipped"}
    return {
        "slug": slug,
        "tenant_id": run_b["tenant_id"],
        "a": _attempt_summary(run_a),
        "b": _attempt_summary(run_b),
        "steps": steps,
        "first_divergence": first,
        "failure_repeated": repeated,
        "reused_steps": reused,
        "summary": _summary(run_a, run_b, reused, first, repeated),
    }


def _attempt_summary(run: Run) -> dict[str, Any]:
    keys = ("attempt_number", "trigger", "resumed_from", "outcome", "failed_step", "error_type")
    return {key: run[key] for key in (*keys, "started_at", "ended_at", "duration_ms")}


def _summary(a: Run, b: Run, reused: dict[str, Any], first: str | None, repeated: bool) -> str:
    na, nb = a["attempt_number"], b["attempt_number"]
    parts = [f"attempt {nb} ({b['trigger'] or '?'}) resumed at {b['resumed_from'] or '?'}"]
    if reused:
        origins = sorted({str(o) for o in reused.values()})
        parts.append(f"reusing {', '.join(reused)} from attempt {', '.join(origins)}")
    parts.append(f"attempt {na} {_outcome(a)}, attempt {nb} {_outcome(b)}")
    parts.append(f"first divergence: {first}" if first else "no step diverged")
    if a["outcome"] == "failed" or b["outcome"] == "failed":
        parts.append("the failure repeated" if repeated else "the failure did not repeat")
    return "; ".join(parts)


def _outcome(run: Run) -> str:
    if run["outcome"] == "failed":
        return f"failed at {run['failed_step']} ({run['error_type']})"
    return str(run["outcome"])
