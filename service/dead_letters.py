"""Keep what could not be understood: a dead-letter row, never a dropped message."""

from __future__ import annotations

import base64

from service.db.models import DeadLetter

MAX_DEAD_LETTER_BYTES = 1_000_000


def dead_letter_of(body: bytes, content_type: str | None, error: str, source: str) -> DeadLetter:
    body = body[:MAX_DEAD_LETTER_BYTES]
    try:
        text, encoding = body.decode("utf-8"), "utf-8"
        if "\x00" in text:  # PostgreSQL text cannot hold NUL
            raise UnicodeDecodeError("utf-8", body, 0, 1, "NUL byte")
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(body).decode("ascii"), "base64"
    return DeadLetter(
        source=source,
        content_type=(content_type or "")[:200] or None,
        body=text,
        body_encoding=encoding,
        error=error[:2000],
    )
