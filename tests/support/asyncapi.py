"""Check commands and events against the message schemas of ``docs/asyncapi.yaml``.

The document is loaded and indexed once: every operation names a channel (address = routing
key = CloudEvent type) and its messages; a ``receive`` operation is a command the service
consumes, a ``send`` operation an event it emits. Each message's ``payload`` is a JSON Schema
(draft-07, as AsyncAPI 3.0 schema objects are) whose ``$ref``\\ s point into the same document.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema import Draft7Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "asyncapi.yaml"
# The URI the document is registered under, so that payload schemas can $ref into it.
DOCUMENT_URI = "urn:tenant-provisioner:asyncapi"

Message = Mapping[str, Any]

# RFC 3339 date-time (the `time` attribute): a full date, a time and a mandatory offset.
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")

FORMATS = FormatChecker(formats=())


@FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.match(value):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time (with an offset)")
    datetime.fromisoformat(value.replace("z", "Z"))  # a real date and time
    return True


@FORMATS.checks("uuid", raises=ValueError)
def _is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return True
    uuid.UUID(value)
    if len(value) != 36 or any(value[i] != "-" for i in (8, 13, 18, 23)):
        raise ValueError(f"{value!r} is not a hyphenated UUID")
    return True


@dataclass(frozen=True, slots=True)
class MessageSchema:
    type: str  # the CloudEvent type: the channel's address, the message's name
    kind: str  # "command" (the service receives it) or "event" (the service sends it)
    pointer: str  # JSON pointer of the message in the document
    validator: Draft7Validator


@cache
def load_document() -> dict[str, Any]:
    with DOCUMENT.open(encoding="utf-8") as handle:
        document: dict[str, Any] = yaml.safe_load(handle)
    return document


def resolve(document: Mapping[str, Any], node: Any) -> tuple[str, Any]:
    """Follow local ``$ref``\\ s (``#/a/b``) from ``node``; return ``(pointer, target)``."""
    pointer = ""
    seen: set[str] = set()
    while isinstance(node, Mapping) and "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise AssertionError(f"{DOCUMENT.name}: only local references are used, not {ref!r}")
        if ref in seen:
            raise AssertionError(f"{DOCUMENT.name}: reference loop at {ref!r}")
        seen.add(ref)
        pointer = ref[1:]
        node = document
        for part in pointer.split("/")[1:]:
            key = part.replace("~1", "/").replace("~0", "~")
            try:
                node = node[int(key)] if isinstance(node, list) else node[key]
            except (KeyError, IndexError, ValueError, TypeError):
                raise AssertionError(f"{DOCUMENT.name}: unresolvable reference {ref!r}") from None
    return pointer, node


@cache
def registry() -> Registry[Any]:
    resource: Resource[Any] = DRAFT7.create_resource(load_document())
    documents: Registry[Any] = Registry().with_resource(DOCUMENT_URI, resource)
    return documents


@cache
def catalog() -> dict[str, MessageSchema]:
    """Every message type of the document, from its operations."""
    document = load_document()
    found: dict[str, MessageSchema] = {}
    kinds = {"receive": "command", "send": "event"}
    for op_id, operation in (document.get("operations") or {}).items():
        kind = kinds.get(operation.get("action"))
        if kind is None:
            raise AssertionError(f"operation {op_id}: action must be send or receive")
        _, channel = resolve(document, operation["channel"])
        address = channel.get("address")
        for ref in operation.get("messages") or []:
            pointer, message = resolve(document, ref)
            name = message.get("name")
            if name != address:
                raise AssertionError(
                    f"operation {op_id}: message {pointer} is named {name!r} but its channel's "
                    f"address (routing key) is {address!r}"
                )
            if name in found and found[name].kind != kind:
                raise AssertionError(f"{name!r} is both a command and an event")
            schema = {"$ref": f"{DOCUMENT_URI}#{pointer}/payload"}
            validator = Draft7Validator(schema, registry=registry(), format_checker=FORMATS)
            found[name] = MessageSchema(name, kind, pointer, validator)
    return found


def message_types() -> set[str]:
    """Every command and event type the document describes."""
    return set(catalog())


def command_types() -> set[str]:
    return {name for name, schema in catalog().items() if schema.kind == "command"}


def event_types() -> set[str]:
    return {name for name, schema in catalog().items() if schema.kind == "event"}


def _jsonable(value: Any) -> Any:
    """The JSON form of what the cloudevents library parses (``time`` as a datetime)."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _path(error: jsonschema.ValidationError) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)[1:]


def _validate(message: Message, kind: str) -> None:
    if not isinstance(message, Mapping):
        raise AssertionError(f"a {kind} is a JSON object, not {type(message).__name__}")
    message_type = message.get("type")
    known = catalog().get(message_type) if isinstance(message_type, str) else None
    if known is None:
        raise AssertionError(
            f"{kind} type {message_type!r} is not a message of {DOCUMENT.name}; "
            f"its {kind}s are {sorted(t for t, s in catalog().items() if s.kind == kind)}"
        )
    if known.kind != kind:
        raise AssertionError(f"{message_type!r} is a {known.kind} of {DOCUMENT.name}, not a {kind}")
    instance = _jsonable(message)
    errors = sorted(known.validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"- {_path(e) or '(body)'}: {e.message}" for e in errors[:10]]
        raise AssertionError(
            f"{kind} {message_type} (id {message.get('id')!r}) does not match "
            f"{known.pointer} of {DOCUMENT.name}:\n" + "\n".join(lines)
        )


def validate_event(event: Message) -> None:
    """Raise ``AssertionError`` unless ``event`` (a parsed CloudEvent, ``data`` a dict) matches
    the schema of its type in the document; an event type the document lacks is an error too."""
    _validate(event, "event")


def validate_command(command: Message) -> None:
    """Like :func:`validate_event`, for a command (a message the service receives)."""
    _validate(command, "command")
