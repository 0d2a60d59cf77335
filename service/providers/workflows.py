"""register_workflows: the tenant's registration with the local workflow-engine registry."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from service.providers.base import Output, StepContext
from service.providers.files import (
    read_json,
    relative_to,
    remove_file,
    tenant_path_component,
    utc_now_iso,
    write_json_atomically,
)

WORKFLOWS: tuple[str, ...] = ("signup", "login", "password-reset", "mfa-enrolment")


def registry_file(ctx: StepContext) -> Path:
    """The tenant's registration; ``activate`` marks the tenant live in the same file."""
    return ctx.data_dir / "registry" / f"{tenant_path_component(ctx.tenant_id)}.json"


def read_registration(ctx: StepContext) -> dict[str, Any] | None:
    """The tenant's registration, or None when there is none (or it is another tenant's)."""
    registration = read_json(registry_file(ctx))
    if registration is None or registration.get("tenant_id") != ctx.tenant_id:
        return None
    if not isinstance(registration.get("registration_id"), str):
        return None
    return registration


class WorkflowRegistryProvider:
    step: str = "register_workflows"

    def run(self, ctx: StepContext) -> Output:
        path = registry_file(ctx)
        existing = read_registration(ctx)
        if existing is None:
            registration: dict[str, Any] = {
                "registration_id": str(uuid.uuid4()),
                "tenant_id": ctx.tenant_id,
                "registered_at": utc_now_iso(),
            }
        else:
            # A rerun keeps the registration (its id, time, and any activation of it) and
            # only makes sure the slug and workflows are the ones wanted.
            registration = dict(existing)
        wanted = {"slug": ctx.slug, "workflows": list(WORKFLOWS)}
        if existing is None or any(registration.get(k) != v for k, v in wanted.items()):
            registration.update(wanted)
            write_json_atomically(path, registration)
        return {
            "registration_id": registration["registration_id"],
            "path": relative_to(ctx.data_dir, path),
        }

    def exists(self, ctx: StepContext, output: Output) -> bool:
        registration = read_registration(ctx)
        return registration is not None and registration["registration_id"] == output.get(
            "registration_id"
        )

    def compensate(self, ctx: StepContext, output: Output) -> None:
        remove_file(registry_file(ctx))
