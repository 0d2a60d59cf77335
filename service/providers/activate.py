"""activate: the tenant goes live in the workflow registry."""

from __future__ import annotations

from sagas.errors import TransientUpstreamError
from service.providers.base import Output, StepContext
from service.providers.files import utc_now_iso, write_json_atomically
from service.providers.workflows import read_registration, registry_file


class ActivateProvider:
    step: str = "activate"

    def run(self, ctx: StepContext) -> Output:
        registration = read_registration(ctx)
        if registration is None:
            # Transient: a retry that resumes from register_workflows can bring it back.
            raise TransientUpstreamError(
                f"no workflow registration for tenant {ctx.tenant_id} to activate"
            )
        activated_at = registration.get("activated_at")
        if registration.get("active") is True and isinstance(activated_at, str):
            return {"activated_at": activated_at}
        activated_at = utc_now_iso()
        write_json_atomically(
            registry_file(ctx), {**registration, "active": True, "activated_at": activated_at}
        )
        return {"activated_at": activated_at}

    def exists(self, ctx: StepContext, output: Output) -> bool:
        registration = read_registration(ctx)
        return registration is not None and registration.get("active") is True

    def compensate(self, ctx: StepContext, output: Output) -> None:
        registration = read_registration(ctx)
        if registration is None or registration.get("active") is not True:
            return
        deactivated = {k: v for k, v in registration.items() if k != "activated_at"}
        write_json_atomically(registry_file(ctx), {**deactivated, "active": False})
