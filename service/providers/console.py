"""configure_admin_console: the tenant's admin console configuration."""

from __future__ import annotations

from pathlib import Path

from service.providers.base import Output, StepContext
from service.providers.files import (
    read_json,
    relative_to,
    remove_file,
    tenant_path_component,
    utc_now_iso,
    write_json_atomically,
)


def console_file(ctx: StepContext) -> Path:
    return ctx.data_dir / "console" / f"{tenant_path_component(ctx.tenant_id)}.json"


class AdminConsoleProvider:
    step: str = "configure_admin_console"

    def run(self, ctx: StepContext) -> Output:
        path = console_file(ctx)
        config = {
            "tenant_id": ctx.tenant_id,
            "slug": ctx.slug,
            "admin_console_url": ctx.console_url,
            "admin_email": ctx.admin_email,
            "plan": ctx.plan,
        }
        existing = read_json(path)
        unchanged = existing is not None and all(existing.get(k) == v for k, v in config.items())
        # An identical rerun leaves the file (and its configured_at) alone.
        if not unchanged:
            write_json_atomically(path, {**config, "configured_at": utc_now_iso()})
        return {
            "console_config": relative_to(ctx.data_dir, path),
            "admin_console_url": ctx.console_url,
        }

    def exists(self, ctx: StepContext, output: Output) -> bool:
        config = read_json(console_file(ctx))
        return (
            config is not None
            and config.get("tenant_id") == ctx.tenant_id
            and config.get("admin_console_url") == output.get("admin_console_url")
        )

    def compensate(self, ctx: StepContext, output: Output) -> None:
        remove_file(console_file(ctx))
