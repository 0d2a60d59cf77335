"""Keep what could not be understood: a dead-letter row, never a dropped message."""

from __future__ import annotations

import base64
from typing import Any

from sqlmodel import Session, select

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


def redelivered(message: Any) -> bool:
    """Whether the broker hands this message back after a consumer died holding it."""
    # RabbitMQ sets the flag on a redelivery; kombu's Redis transport a header when it restores.
    info = message.delivery_info or {}
    headers = message.headers or {}
    return bool(info.get("redelivered") or headers.get("redelivered"))


def already_kept(session: Session, dead_letter: DeadLetter) -> bool:
    """Whether these very bytes are kept already, from the same source: a redelivery after a
    crash between the commit that kept them and the broker's acknowledgement."""
    found = session.exec(
        select(DeadLetter.id)
        .where(DeadLetter.source == dead_letter.source)
        .where(DeadLetter.body == dead_letter.body)
        .where(DeadLetter.body_encoding == dead_letter.body_encoding)
        .limit(1)
    ).first()
    return found is not None
