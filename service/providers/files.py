"""File helpers the providers share: atomic writes, tolerant reads, idempotent removal.

Every write goes to a temporary file in the target's own directory and is then renamed over
the target, so a crash leaves either the old file or the new one, never half of one that an
``exists`` check could mistake for finished work.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sagas.errors import FatalUpstreamError

# Tenant ids are uuids; anything that could climb out of its folder is refused outright.
_SAFE_PATH_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def tenant_path_component(tenant_id: str) -> str:
    """The tenant id, checked to be safe as one path component."""
    if not _SAFE_PATH_COMPONENT.fullmatch(tenant_id):
        raise FatalUpstreamError(f"tenant id {tenant_id!r} is not a safe path component")
    return tenant_id


def relative_to(data_dir: Path, path: Path) -> str:
    """``path`` as stored in a step's output: relative to the data dir, with forward slashes."""
    return path.relative_to(data_dir).as_posix()


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat()


def write_bytes_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # Set the mode before any byte is written, so a secret is never readable by others.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomically(path: Path, data: Mapping[str, Any], mode: int = 0o644) -> None:
    body = json.dumps(dict(data), indent=2, sort_keys=True) + "\n"
    write_bytes_atomically(path, body.encode("utf-8"), mode)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing or holds no JSON object."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def remove_file(path: Path) -> None:
    path.unlink(missing_ok=True)


def remove_tree(path: Path) -> None:
    """Remove a directory and everything in it; nothing there is fine (compensation reruns)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """Changes whenever the file is replaced (an atomic write makes a new inode); None if absent."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an flock on ``path`` (made if missing): one holder across processes and threads."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry itself reaches the disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
