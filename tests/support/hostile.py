"""Hypothesis strategies for hostile command messages: every one of them is malformed by
construction (not JSON, not an object, not a CloudEvent, an unknown type, bad ``data``, or a
content type the listener does not accept), with wrong types, huge strings, unicode, NUL
characters, missing fields and deep nesting.

A message is ``(payload, content_type)``; the payload is raw bytes, or a JSON value that
:func:`serialise` turns into bytes after giving any string ``id`` a unique prefix (the same id
twice is, rightly, one command: the test wants each hostile message to be its own). An empty
id stays empty: the prefix would make it valid.
"""

from __future__ import annotations

import json
import string
from typing import Any

from hypothesis import strategies as st

from sagas.messages import CommandType

Payload = bytes | Any
Message = tuple[Payload, str | None]

COMMAND_TYPES = [t.value for t in CommandType]
GOOD_CONTENT_TYPES = [
    "application/cloudevents+json",
    "application/json",
    "application/cloudevents+json; charset=utf-8",
]
PATH_AND_SQL = [
    "../../../../../../etc/passwd",
    "..\\..\\..\\windows\\system32",
    "/etc/shadow",
    "a'; DROP TABLE tenants; --",
    'x" OR "1"="1',
    "%2e%2e%2f%2e%2e%2f",
    "$(rm -rf /)",
    "`id`",
    "\u0000\u0001\u0002",
    "Robert'); DELETE FROM outbox;--",
]

# Text that includes what breaks naive code: unicode of every plane, NUL, control characters,
# right-to-left marks, surrogate-free emoji, and the path and SQL tricks.
nasty_text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=60),
    st.sampled_from(PATH_AND_SQL),
    st.sampled_from(["", " ", "\n", "\u202e", "é" * 3, "🙂", "\u0000"]),
)
huge_text = st.builds(
    lambda ch, n: ch * n,
    st.sampled_from(["x", "é", "🙂", "\u0000", "a-"]),
    st.integers(min_value=201, max_value=20_000),
)
any_text = nasty_text
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    any_text,
)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(nasty_text, inner, max_size=4)
    ),
    max_leaves=8,
)
not_a_string = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(scalars, max_size=3),
    st.dictionaries(nasty_text, scalars, max_size=3),
)
content_types = st.sampled_from(GOOD_CONTENT_TYPES)


def envelope(command_type: str, data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "cmd",
        "source": "urn:hostile",
        "type": command_type,
        "time": "2024-01-01T00:00:00Z",
        "subject": "whatever",
        "data": data,
    }


@st.composite
def not_json(draw: st.DrawFn) -> Message:
    tail = draw(st.binary(max_size=300))
    head = draw(st.sampled_from([b"\x07", b"<", b"{'single': quotes}", b'{"unclosed": ', b"\xff"]))
    return head + tail, draw(content_types)


@st.composite
def not_an_object(draw: st.DrawFn) -> Message:
    value = draw(st.one_of(st.lists(junk, max_size=5), scalars))
    return value, draw(content_types)


@st.composite
def broken_envelope(draw: st.DrawFn) -> Message:
    body = envelope(draw(st.sampled_from(COMMAND_TYPES)), {"slug": "hostile-x", "plan": "pro"})
    field = draw(st.sampled_from(["specversion", "id", "source", "type", "data"]))
    if draw(st.booleans()):
        del body[field]
    else:
        body[field] = draw(
            {
                "specversion": st.one_of(not_a_string, st.sampled_from(["0.3", "1", "2.0", ""])),
                "id": st.one_of(not_a_string, st.just(""), huge_text),
                "source": st.one_of(not_a_string, st.just("")),
                "type": st.one_of(not_a_string, st.just("")),
                "data": st.one_of(st.lists(junk, max_size=3), scalars),
            }[field]
        )
    if field != "id" and draw(st.booleans()):
        body["id"] = draw(st.one_of(any_text, not_a_string))
    return body, draw(content_types)


@st.composite
def unknown_type(draw: st.DrawFn) -> Message:
    # A prefix no command type has, so that the type is unknown by construction.
    kind = "x." + draw(nasty_text)
    return envelope(kind, draw(junk)), draw(content_types)


@st.composite
def bad_data(draw: st.DrawFn) -> Message:
    command_type = draw(st.sampled_from(COMMAND_TYPES))
    data: dict[str, Any] = {"slug": "hostile-x", "plan": "pro", "requested_by": "x"}
    if draw(st.booleans()):
        data.setdefault(draw(nasty_text), draw(junk))
    breakage = draw(st.sampled_from(["slug", "slug", "slug", "requested_by", "reason", "extra"]))
    if command_type == CommandType.PROVISION.value and draw(st.booleans()):
        breakage = "plan"
    if command_type == CommandType.RETRY.value and draw(st.booleans()):
        breakage = "force"
    if breakage == "slug":
        choice = draw(st.sampled_from(["missing", "type", "huge", "empty"]))
        if choice == "missing":
            del data["slug"]
        elif choice == "type":
            data["slug"] = draw(not_a_string)
        elif choice == "huge":
            data["slug"] = draw(huge_text)
        else:
            data["slug"] = ""
    elif breakage == "plan":
        if draw(st.booleans()):
            del data["plan"]
        else:
            data["plan"] = draw(st.one_of(not_a_string, huge_text))
    elif breakage == "force":
        data["force"] = draw(
            st.one_of(st.sampled_from(["true", "yes", 1, 0, "1"]), st.lists(scalars, max_size=2))
        )
    elif breakage == "requested_by":
        data["requested_by"] = draw(st.one_of(not_a_string, huge_text))
    elif breakage == "reason":
        data["reason"] = draw(
            st.one_of(not_a_string.filter(lambda v: v is not None), st.just("r" * 2001))
        )
    else:
        data = draw(st.one_of(st.lists(junk, max_size=3), scalars))  # data not an object
    return envelope(command_type, data), draw(content_types)


@st.composite
def wrong_content_type(draw: st.DrawFn) -> Message:
    """A command that would be valid, under a content type the listener refuses."""
    body = envelope(CommandType.RESET.value, {"slug": "hostile-valid-body"})
    printable = st.text(alphabet=string.printable.strip(), max_size=80)
    content_type = draw(
        st.one_of(
            st.sampled_from(
                [
                    "text/plain",
                    "application/xml",
                    "application/octet-stream",
                    "",
                    "json",
                    "application/cloudevents+jsonx",
                    "application/cloudevents",
                    "text/json",
                ]
            ),
            printable.filter(
                lambda t: (
                    t.split(";")[0].strip().lower()
                    not in {"application/json", "application/cloudevents+json"}
                )
            ),
        )
    )
    return body, content_type


@st.composite
def deep_nesting(draw: st.DrawFn) -> Message:
    depth = draw(st.integers(min_value=500, max_value=5_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    raw = (opener * depth + "1" + closer * depth).encode()
    return raw, draw(content_types)


hostile_messages = st.one_of(
    not_json(),
    not_an_object(),
    broken_envelope(),
    broken_envelope(),
    unknown_type(),
    bad_data(),
    bad_data(),
    bad_data(),
    wrong_content_type(),
    deep_nesting(),
)


def serialise(number: int, payload: Payload) -> bytes:
    """Bytes to publish; a string ``id`` gets a unique prefix (see the module's docstring)."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, dict) and isinstance(payload.get("id"), str) and payload["id"]:
        payload = dict(payload, id=f"hostile-{number}-{payload['id']}")
    ascii_only = number % 2 == 0  # both \\u escapes and raw UTF-8 on the wire
    return json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
