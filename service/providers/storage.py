"""provision_storage: the tenant's folder, with its metadata file and user and key folders."""

from __future__ import annotations

from pathlib import Path

from service.providers.base import Output, StepContext
from service.providers.files import (
    read_json,
    relative_to,
    remove_tree,
    tenant_path_component,
    utc_now_iso,
    write_json_atomically,
)

SUBFOLDERS: tuple[str, ...] = ("users", "keys")
METADATA_FILE = "tenant.json"


def storage_dir(ctx: StepContext) -> Path:
    return ctx.data_dir / "storage" / tenant_path_component(ctx.tenant_id)


class StorageProvider:
    step: str = "provision_storage"

    def run(self, ctx: StepContext) -> Output:
        root = storage_dir(ctx)
        for name in SUBFOLDERS:
            (root / name).mkdir(parents=True, exist_ok=True)
        metadata_path = root / METADATA_FILE
        existing = read_json(metadata_path)
        # A rerun keeps the first creation time: the folder was made then, not now.
        created_at = (
            existing["created_at"]
            if existing is not None
            and existing.get("tenant_id") == ctx.tenant_id
            and isinstance(existing.get("created_at"), str)
            else utc_now_iso()
        )
        # Written last, so its presence means the folders before it are all there.
        write_json_atomically(
            metadata_path,
            {
                "tenant_id": ctx.tenant_id,
                "slug": ctx.slug,
                "plan": ctx.plan,
                "created_at": created_at,
            },
        )
        return {"storage_id": ctx.tenant_id, "path": relative_to(ctx.data_dir, root)}

    def exists(self, ctx: StepContext, output: Output) -> bool:
        if output.get("storage_id", ctx.tenant_id) != ctx.tenant_id:
            return False
        root = storage_dir(ctx)
        metadata = read_json(root / METADATA_FILE)
        return (
            metadata is not None
            and metadata.get("tenant_id") == ctx.tenant_id
            and all((root / name).is_dir() for name in SUBFOLDERS)
        )

    def compensate(self, ctx: StepContext, output: Output) -> None:
        remove_tree(storage_dir(ctx))
