"""docs/asyncapi.yaml: a valid AsyncAPI 3.0.0 document, complete against the contract, and true
to the messages the service really builds.

The document is checked against the official AsyncAPI 3.0.0 JSON Schema (vendored, see
schemas/README.md), then against shared/contract.md (every command and event type, field,
reason, state, step and plan), then against messages made by the service's own builders
(``service.events.build_event`` / ``read_event``, ``sagas.messages.parse_command``).
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from config.keys import CLOUDEVENTS_CONTENT_TYPE, COMMANDS_EXCHANGE, EVENT_SOURCE, EVENTS_EXCHANGE
from sagas.errors import MalformedCommand
from sagas.messages import DATA_MODELS, CommandType, EventType, parse_command
from sagas.rules import Reason
from sagas.states import TenantState
from sagas.steps import COMPENSATED, PLANS, SLUG_PATTERN, STEPS
from service.db.models import Attempt, Tenant
from service.decommission_runner import decommission_event_data
from service.events import build_event, read_event
from service.saga_runner import attempt_event_data
from tests.support import asyncapi
from tests.support.asyncapi import (
    catalog,
    command_types,
    event_types,
    load_document,
    message_types,
    resolve,
    validate_command,
    validate_event,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = Path(__file__).with_name("schemas") / "asyncapi-3.0.0.json"
# shared/ sits beside the repository (the work tree, and CI's clone alike).
CONTRACT_CANDIDATES = (
    Path(__file__).resolve().parents[3] / "shared" / "contract.md",
    ROOT / "shared" / "contract.md",
)
TICK = re.compile(r"`([^`]+)`")

TENANT_ID = "5b1f0a3e-8c2d-4e6f-9a7b-1c2d3e4f5a6b"
SLUG = "acme-corp"


# --------------------------------------------------------------------------- helpers
def document() -> dict[str, Any]:
    """A fresh copy: tests that break it must not break the others."""
    return copy.deepcopy(load_document())


@cache
def asyncapi_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return schema


def asyncapi_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(
        asyncapi_schema(), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}"
        for e in validator.iter_errors(doc)
    ]


def walk(node: Any, pointer: str = "") -> Iterator[tuple[str, Any]]:
    yield pointer, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{pointer}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{pointer}/{index}")


def flatten(schema: Any) -> tuple[dict[str, list[Any]], set[str]]:
    """``(properties, required)`` of an object schema, through ``$ref`` and ``allOf``; each
    property maps to every schema given for it."""
    doc = load_document()
    _, schema = resolve(doc, schema)
    properties: dict[str, list[Any]] = {}
    required: set[str] = set(schema.get("required", []))
    for name, sub in (schema.get("properties") or {}).items():
        properties.setdefault(name, []).append(sub)
    for part in schema.get("allOf", []):
        more, more_required = flatten(part)
        for name, subs in more.items():
            properties.setdefault(name, []).extend(subs)
        required |= more_required
    return properties, required


def values_of(schema: Any) -> set[Any]:
    """Every ``enum``/``const`` value reachable inside ``schema``."""
    _, schema = resolve(load_document(), schema)
    found: set[Any] = set()
    if isinstance(schema, dict):
        found.update(v for v in schema.get("enum", []) if not isinstance(v, dict | list))
        if "const" in schema:
            found.add(schema["const"])
        for key in ("allOf", "anyOf", "oneOf"):
            for part in schema.get(key, []):
                found |= values_of(part)
        if "items" in schema:
            found |= values_of(schema["items"])
        for sub in (schema.get("properties") or {}).values():
            found |= values_of(sub)
    return found


def payload(message_type: str) -> Any:
    doc = load_document()
    _, message = resolve(doc, {"$ref": f"#{catalog()[message_type].pointer}"})
    return message["payload"]


def data_schema(message_type: str) -> tuple[dict[str, list[Any]], set[str]]:
    properties, _ = flatten(payload(message_type))
    merged: dict[str, list[Any]] = {}
    required: set[str] = set()
    for sub in properties["data"]:
        more, more_required = flatten(sub)
        for name, subs in more.items():
            merged.setdefault(name, []).extend(subs)
        required |= more_required
    return merged, required


def data_names(message_type: str) -> set[str]:
    """Field names of a message's ``data``, one level of nesting included (``details``)."""
    properties, _ = data_schema(message_type)
    names = set(properties)
    for subs in properties.values():
        for sub in subs:
            names |= set(flatten(sub)[0])
    return names


def data_values(message_type: str) -> set[Any]:
    properties, _ = data_schema(message_type)
    return {value for subs in properties.values() for sub in subs for value in values_of(sub)}


def enum_of(name: str) -> list[Any]:
    values: list[Any] = load_document()["components"]["schemas"][name]["enum"]
    return values


# --------------------------------------------------------------------------- the contract
@cache
def contract_text() -> str | None:
    for candidate in CONTRACT_CANDIDATES:
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    return None


def contract() -> str:
    text = contract_text()
    if text is None:
        pytest.skip(
            "shared/contract.md not found (looked at "
            f"{', '.join(map(str, CONTRACT_CANDIDATES))}); the contract checks need it"
        )
    return text


def section(text: str, heading: str) -> str:
    match = re.search(rf"^#+ {re.escape(heading)}.*?$(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert match, f"contract.md has no section {heading!r}"
    return match.group(1)


def table_rows(text: str) -> list[tuple[list[str], str]]:
    """``(types, data column)`` of each table row naming ``tenant.*`` types; a row such as
    ``tenant.decommission.started`` / ``.step_completed`` names several."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`tenant."):
            continue
        names = TICK.findall(cells[0])
        full = names[0]
        prefix = full.rsplit(".", 1)[0]
        types = [full] + [prefix + name for name in names[1:] if name.startswith(".")]
        rows.append((types, cells[1]))
    return rows


def contract_commands() -> list[tuple[list[str], str]]:
    return table_rows(section(contract(), "Commands (`tenant.commands`)"))


def contract_events() -> list[tuple[list[str], str]]:
    return table_rows(section(contract(), "Events (`tenant.events`)"))


# =========================================================================== (a) the document
def test_the_vendored_schema_is_asyncapi_3_0_0() -> None:
    schema = asyncapi_schema()
    assert schema["$id"] == "http://asyncapi.com/definitions/3.0.0/asyncapi.json"
    jsonschema.Draft7Validator.check_schema(schema)


def test_the_document_is_valid_asyncapi_3_0_0() -> None:
    doc = document()
    assert doc["asyncapi"] == "3.0.0"
    assert asyncapi_errors(doc) == []


@pytest.mark.parametrize(
    ("what", "breakage"),
    [
        (
            "an unknown action",
            lambda d: d["operations"]["sendProvisioningFailed"].update(action="publish"),
        ),
        (
            "a bad AMQP exchange type",
            lambda d: d["components"]["channelBindings"]["eventsExchange"]["amqp"][
                "exchange"
            ].update(type="fan-out"),
        ),
        (
            "a message without payload key typo",
            lambda d: d["components"]["messages"]["commandRejected"].update(payloadd={}),
        ),
        ("no info", lambda d: d.pop("info")),
    ],
)
def test_the_schema_check_catches_a_broken_document(what: str, breakage: Any) -> None:
    doc = document()
    breakage(doc)
    assert asyncapi_errors(doc), f"{what} was not caught"


def test_every_local_reference_resolves() -> None:
    doc = load_document()
    refs = [node["$ref"] for _, node in walk(doc) if isinstance(node, dict) and "$ref" in node]
    assert refs
    for ref in refs:
        resolve(doc, {"$ref": ref})  # raises on a dangling one


def test_every_component_schema_is_a_valid_json_schema() -> None:
    for name, schema in load_document()["components"]["schemas"].items():
        try:
            jsonschema.Draft7Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            pytest.fail(f"components/schemas/{name}: {exc.message}")


def test_no_ref_has_siblings_that_draft_07_would_ignore() -> None:
    # In an AsyncAPI 3.0 (draft-07) schema, keywords beside $ref are ignored: a `type` or an
    # `enum` there would silently not apply. Descriptions go on the target or in an allOf.
    for pointer, node in walk(load_document()["components"]["schemas"], "/components/schemas"):
        if isinstance(node, dict) and "$ref" in node:
            assert set(node) == {"$ref"}, (
                f"{pointer} has {sorted(set(node) - {'$ref'})} beside $ref"
            )


def test_one_channel_per_message_type_addressed_by_its_routing_key() -> None:
    doc = load_document()
    addresses = [channel["address"] for channel in doc["channels"].values()]
    assert len(addresses) == len(set(addresses))
    assert set(addresses) == message_types()
    for channel_id, channel in doc["channels"].items():
        messages = list(channel["messages"].values())
        assert len(messages) == 1, channel_id
        _, message = resolve(doc, messages[0])
        assert message["name"] == channel["address"], channel_id
        assert message["contentType"] == CLOUDEVENTS_CONTENT_TYPE, channel_id
        # the payload fixes the CloudEvent type to the routing key
        assert channel["address"] in values_of(flatten(message["payload"])[0]["type"][-1])


def test_commands_are_received_from_tenant_commands_and_events_sent_on_tenant_events() -> None:
    doc = load_document()
    seen_channels = set()
    for op_id, operation in doc["operations"].items():
        channel_pointer, channel = resolve(doc, operation["channel"])
        seen_channels.add(channel_pointer)
        _, bindings = resolve(doc, channel["bindings"])
        exchange = bindings["amqp"]["exchange"]
        assert exchange["type"] == "topic", op_id
        assert exchange["durable"] is True, op_id
        expected = COMMANDS_EXCHANGE if operation["action"] == "receive" else EVENTS_EXCHANGE
        assert exchange["name"] == expected, op_id
        # AsyncAPI 3: an operation's messages are references into its own channel
        for ref in operation["messages"]:
            assert ref["$ref"].startswith(f"#{channel_pointer}/messages/"), op_id
    assert seen_channels == {f"/channels/{name}" for name in doc["channels"]}


def test_command_and_event_types_are_the_services_own() -> None:
    assert command_types() == {t.value for t in CommandType}
    assert event_types() == {t.value for t in EventType}
    assert set(DATA_MODELS) == set(CommandType)


def test_the_vocabularies_are_the_services_own() -> None:
    assert enum_of("TenantState") == [s.value for s in TenantState]
    assert enum_of("Step") == list(STEPS)
    assert set(enum_of("CompensationStep")) == set(COMPENSATED)
    assert enum_of("CompensationStep") == [s for s in STEPS if s in COMPENSATED]
    assert set(enum_of("Plan")) == set(PLANS)
    assert enum_of("RejectionReason") == [r.value for r in Reason]
    provision = flatten(flatten(payload("tenant.provision_requested"))[0]["data"][-1])[0]
    assert {"pattern": SLUG_PATTERN}.items() <= provision["slug"][-1].items()


@pytest.mark.parametrize("message_id", sorted(load_document()["components"]["messages"]))
def test_every_message_has_examples_that_validate(message_id: str) -> None:
    message = load_document()["components"]["messages"][message_id]
    examples = message.get("examples") or []
    assert examples, f"{message_id} has no example"
    validate = validate_command if message["name"] in command_types() else validate_event
    for example in examples:
        assert example["payload"]["type"] == message["name"]
        validate(example["payload"])


# =========================================================================== (b) the contract
def test_every_command_of_the_contract_is_a_message() -> None:
    named = {t for types, _ in contract_commands() for t in types}
    assert named == {t.value for t in CommandType}, "the contract's command table changed?"
    assert named <= command_types(), f"missing commands: {sorted(named - command_types())}"


def test_every_event_of_the_contract_is_a_message() -> None:
    named = {t for types, _ in contract_events() for t in types}
    assert len(named) == 13, named
    assert named <= event_types(), f"missing events: {sorted(named - event_types())}"


def test_the_contract_names_no_message_the_document_lacks() -> None:
    mentioned = set(re.findall(r"`(tenant\.[a-z_.]+[a-z_])`", contract()))
    mentioned -= {COMMANDS_EXCHANGE, EVENTS_EXCHANGE}
    # `tenant.provisioning.*` and `tenant.#` are binding patterns, not types
    assert mentioned <= message_types(), sorted(mentioned - message_types())


def test_every_command_field_of_the_contract_is_in_its_data_schema() -> None:
    for types, column in contract_commands():
        (command_type,) = types
        fields = set(TICK.findall(column))
        properties, required = data_schema(command_type)
        assert fields <= set(properties), (command_type, sorted(fields - set(properties)))
        # only what the contract does not call optional is required (and slug always is)
        optional = set(re.findall(r"optional ((?:`\w+`(?:, )?)+)", column))
        optional_fields = {f for group in optional for f in TICK.findall(group)}
        assert "slug" in required
        assert not (required & optional_fields), command_type


def test_every_event_field_of_the_contract_is_in_its_data_schema() -> None:
    for types, column in contract_events():
        tokens = set(TICK.findall(column))
        names = set().union(*(data_names(t) for t in types))
        values = set().union(*(data_values(t) for t in types))
        unknown = tokens - names - values
        assert not unknown, f"{types}: {sorted(unknown)} are neither fields nor values"
        # a field of a single-type row is always sent
        if len(types) == 1:
            _, required = data_schema(types[0])
            top = set(data_schema(types[0])[0])
            assert (tokens & top) <= required, (types, sorted((tokens & top) - required))


def test_every_event_has_the_common_fields() -> None:
    assert "`tenant_id`, `slug`, `state`" in contract()
    for event_type in event_types():
        _, required = data_schema(event_type)
        assert {"tenant_id", "slug", "state"} <= required, event_type
        if event_type.startswith("tenant.provisioning."):
            assert "attempt_number" in required, event_type


def test_the_rejection_reasons_are_the_contracts() -> None:
    line = re.search(r"Rejection reasons:(.*?)\.\s", contract(), re.S)
    assert line
    reasons = TICK.findall(line.group(1))
    assert len(reasons) == 8
    assert enum_of("RejectionReason") == reasons
    assert set(reasons) <= data_values("tenant.command.rejected")


def test_the_states_steps_and_plans_are_the_contracts() -> None:
    text = contract()
    # the state names (other tokens there, `provision_requested` and `tenant_id`, have a `_`)
    states = {t for t in TICK.findall(section(text, "Tenant states")) if t.isalpha()}
    assert set(enum_of("TenantState")) == states
    steps_text = section(text, "The provisioning saga's steps").split("Each has")[0]
    assert enum_of("Step") == TICK.findall(steps_text)
    plans = re.search(r"Plans: (.*?)\.", text)
    assert plans
    assert set(enum_of("Plan")) == set(TICK.findall(plans.group(1)))
    assert SLUG_PATTERN in text


# =========================================================================== (c) real messages
def tenant(state: str = "provisioning") -> Tenant:
    return Tenant(id=TENANT_ID, slug=SLUG, live_slug=SLUG, plan="pro", state=state, epoch=1)


def attempt(number: int = 1) -> Attempt:
    return Attempt(
        id=str(uuid.uuid4()),
        tenant_id=TENANT_ID,
        number=number,
        epoch=number,
        trigger="create" if number == 1 else "retry",
        state="running",
        requested_by="test-suite",
        resumed_from="validate",
    )


def real_events() -> list[tuple[EventType, str | None, dict[str, Any]]]:
    """One event of every type, its data made as the service makes it."""
    provisioning, active, failed = tenant(), tenant("active"), tenant("failed")
    decommissioning, gone = tenant("decommissioning"), tenant("decommissioned")
    return [
        (
            EventType.STARTED,
            SLUG,
            attempt_event_data(
                provisioning,
                attempt(2),
                trigger="retry",
                resumed_from="issue_certificate",
                reused_steps=list(STEPS[:4]),
                requested_by="ops@example.com",
            ),
        ),
        (
            EventType.STEP_STARTED,
            SLUG,
            attempt_event_data(provisioning, attempt(), step="validate"),
        ),
        (
            EventType.STEP_COMPLETED,
            SLUG,
            attempt_event_data(
                provisioning,
                attempt(),
                step="provision_storage",
                duration_ms=14,
                output={"storage_id": TENANT_ID, "path": f"storage/{SLUG}"},
            ),
        ),
        (
            EventType.STEP_COMPLETED,
            SLUG,
            attempt_event_data(
                active,
                attempt(),
                step="activate",
                duration_ms=0,
                output={"activated_at": datetime.now(UTC).isoformat()},
            ),
        ),
        (
            EventType.STEP_SKIPPED,
            SLUG,
            attempt_event_data(
                provisioning, attempt(3), step="reserve_slot", reused_from_attempt=1
            ),
        ),
        (
            EventType.STEP_RETRYING,
            SLUG,
            attempt_event_data(
                provisioning,
                attempt(),
                step="issue_certificate",
                error="TransientUpstreamError: CA unavailable",
                retry_in_s=1.734,
                **{"try": 1},
            ),
        ),
        (
            EventType.FAILED,
            SLUG,
            attempt_event_data(
                failed,
                attempt(),
                failed_activity="validate",
                details={"error_type": "ValidationFailed", "message": "unknown plan", "tries": 1},
                retryable=False,
                repeated_failure=False,
                retries_left=2,
            ),
        ),
        (
            EventType.COMPLETED,
            SLUG,
            attempt_event_data(
                active,
                attempt(),
                admin_console_url=f"http://127.0.0.1:8080/console/{SLUG}",
                duration_ms=8412,
            ),
        ),
        (
            EventType.RESET,
            SLUG,
            {
                "tenant_id": TENANT_ID,
                "slug": SLUG,
                "state": "failed",
                "attempt_number": 2,
                "reset_attempt": 2,
                "lock_released": True,
                "requested_by": "ops",
            },
        ),
        (
            EventType.RESET,
            SLUG,
            {
                "tenant_id": TENANT_ID,
                "slug": SLUG,
                "state": "active",
                "attempt_number": None,
                "reset_attempt": None,
                "lock_released": False,
                "requested_by": "unknown",
            },
        ),
        (
            EventType.DECOMMISSION_STARTED,
            SLUG,
            decommission_event_data(
                decommissioning,
                steps=[s for s in reversed(STEPS) if s in COMPENSATED],
                requested_by="billing",
            ),
        ),
        (
            EventType.DECOMMISSION_STARTED,
            SLUG,
            decommission_event_data(decommissioning, steps=[], requested_by="billing"),
        ),
        (
            EventType.DECOMMISSION_STEP_COMPLETED,
            SLUG,
            decommission_event_data(decommissioning, step="reserve_slot"),
        ),
        (EventType.DECOMMISSION_COMPLETED, SLUG, decommission_event_data(gone)),
        (
            EventType.DECOMMISSION_FAILED,
            SLUG,
            decommission_event_data(
                decommissioning,
                step="register_workflows",
                error="registry down",
                message=f"run `provisioner decommission {SLUG}` again to resume",
            ),
        ),
        (
            EventType.DECOMMISSION_FAILED,
            SLUG,
            decommission_event_data(
                decommissioning, step=None, error="boom", message="run it again"
            ),
        ),
        (
            EventType.COMMAND_REJECTED,
            SLUG,
            {
                "tenant_id": TENANT_ID,
                "slug": SLUG,
                "state": "failed",
                "command_type": "tenant.retry_requested",
                "command_id": "cmd-1",
                "reason": "retry_cap_reached",
                "message": "escalate",
            },
        ),
        (
            EventType.COMMAND_REJECTED,
            "no-such-tenant",
            {
                "tenant_id": None,
                "slug": "no-such-tenant",
                "state": None,
                "command_type": "tenant.reset_requested",
                "command_id": "cmd-2",
                "reason": "unknown_tenant",
                "message": "no tenant no-such-tenant",
            },
        ),
        (
            EventType.COMMAND_REJECTED,
            "Bad Slug!",
            {
                "tenant_id": None,
                "slug": "Bad Slug!",
                "state": None,
                "command_type": "tenant.explode",
                "command_id": None,
                "reason": "malformed",
                "message": "unknown command type 'tenant.explode'",
            },
        ),
    ]


def publish(event_type: EventType, subject: str | None, data: dict[str, Any]) -> dict[str, Any]:
    """What a consumer of tenant.events parses: the service's own builder and reader."""
    _, body = build_event(event_type, subject, data)
    return read_event(body)


@pytest.mark.parametrize(
    ("event_type", "subject", "data"),
    real_events(),
    ids=[f"{t.value}-{i}" for i, (t, _, _) in enumerate(real_events())],
)
def test_a_real_event_validates(event_type: EventType, subject: str, data: dict[str, Any]) -> None:
    event = publish(event_type, subject, data)
    assert isinstance(event["time"], datetime)  # as the cloudevents library parses it
    assert event["source"] == EVENT_SOURCE
    validate_event(event)
    validate_event(json.loads(build_event(event_type, subject, data)[1]))  # the raw JSON too


def test_real_events_cover_every_event_type() -> None:
    assert {t.value for t, _, _ in real_events()} == event_types()


def test_a_rejection_without_a_slug_validates() -> None:
    # A malformed command that named no slug: the service leaves the subject out (CloudEvents
    # forbids an empty one), or, before that fix, could not build the event at all.
    data = {
        "tenant_id": None,
        "slug": "",
        "state": None,
        "command_type": "tenant.provision_requested",
        "command_id": None,
        "reason": "malformed",
        "message": "body is not valid JSON",
    }
    event = publish(EventType.COMMAND_REJECTED, None, data)
    assert "subject" not in event
    validate_event(event)


def broken(event_type: EventType, change: Any) -> dict[str, Any]:
    _, subject, data = next(e for e in real_events() if e[0] is event_type)
    data = copy.deepcopy(data)
    change(data)
    return publish(event_type, subject, data)


@pytest.mark.parametrize(
    ("event_type", "change", "complaint"),
    [
        (EventType.FAILED, lambda d: d.pop("failed_activity"), "failed_activity"),
        (EventType.FAILED, lambda d: d["details"].pop("tries"), "tries"),
        (EventType.FAILED, lambda d: d.update(retryable="no"), "retryable"),
        (EventType.STEP_STARTED, lambda d: d.update(state="bogus"), "bogus"),
        (EventType.STEP_STARTED, lambda d: d.update(step="make_coffee"), "make_coffee"),
        (EventType.STEP_STARTED, lambda d: d.pop("attempt_number"), "attempt_number"),
        (EventType.STARTED, lambda d: d.update(trigger="manual"), "manual"),
        (EventType.STARTED, lambda d: d.update(reused_steps="validate"), "reused_steps"),
        (EventType.COMPLETED, lambda d: d.update(state="failed"), "state"),
        (EventType.COMPLETED, lambda d: d.update(tenant_id="42"), "tenant_id"),
        (EventType.RESET, lambda d: d.pop("lock_released"), "lock_released"),
        (EventType.STEP_RETRYING, lambda d: d.update({"try": "1"}), "try"),
        (EventType.COMMAND_REJECTED, lambda d: d.update(reason="nope"), "nope"),
        (EventType.COMMAND_REJECTED, lambda d: d.pop("command_id"), "command_id"),
        (EventType.DECOMMISSION_STEP_COMPLETED, lambda d: d.update(step="validate"), "step"),
    ],
)
def test_a_wrong_event_fails(event_type: EventType, change: Any, complaint: str) -> None:
    with pytest.raises(AssertionError, match=complaint):
        validate_event(broken(event_type, change))


def good_event() -> dict[str, Any]:
    event_type, subject, data = real_events()[1]
    return publish(event_type, subject, data)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda e: e.update(type="tenant.provisioning.exploded"), "not a message"),
        (lambda e: e.update(type="tenant.retry_requested"), "command"),
        (lambda e: e.update(specversion="0.3"), "specversion"),
        (lambda e: e.pop("subject"), "subject"),
        (lambda e: e.pop("time"), "time"),
        (lambda e: e.update(time="yesterday"), "date-time"),
        (lambda e: e.update(time=datetime(2026, 1, 1, 12, 0)), "date-time"),  # no offset
        (lambda e: e.update(source="urn:someone-else"), "urn:provisioner"),
        (lambda e: e.update(datacontenttype="text/plain"), "application/json"),
        (lambda e: e.update(data=None), "data"),
    ],
)
def test_a_wrong_envelope_fails(change: Any, complaint: str) -> None:
    event = good_event()
    change(event)
    with pytest.raises(AssertionError, match=complaint):
        validate_event(event)


def test_extra_fields_are_allowed() -> None:
    event = good_event()
    event["data"]["something_new"] = {"any": ["thing"]}
    event["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    validate_event(event)


# --- commands: the listener's own parser
def command(command_type: CommandType, **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "urn:platform:tests",
        "type": command_type.value,
        "time": datetime.now(UTC).isoformat(),
        "subject": SLUG,
        "datacontenttype": "application/json",
        "data": {"slug": SLUG, "requested_by": "platform-tests", **data},
    }


REAL_COMMANDS = [
    command(CommandType.PROVISION, plan="pro", admin_email="admin@acme.example"),
    command(CommandType.PROVISION, plan="free"),
    command(CommandType.RETRY, reason="registry is back", force=True),
    command(CommandType.RETRY),
    command(CommandType.RESET, reason="stuck"),
    command(CommandType.DECOMMISSION, reason="contract ended"),
    {
        "specversion": "1.0",
        "id": "minimal",
        "source": "s",
        "type": CommandType.RESET.value,
        "data": {"slug": SLUG},
    },
]


@pytest.mark.parametrize("raw", REAL_COMMANDS, ids=lambda c: f"{c['type']}-{c['id'][:8]}")
def test_a_real_command_round_trips(raw: dict[str, Any]) -> None:
    validate_command(raw)
    for content_type in (CLOUDEVENTS_CONTENT_TYPE, "application/json; charset=utf-8"):
        parsed = parse_command(json.dumps(raw), content_type)
        assert parsed.id == raw["id"]
        assert parsed.type.value == raw["type"]
    # What the listener understood, written back as a command, is valid too (defaults filled).
    echoed = {**raw, "data": parsed.data.model_dump()}
    validate_command(echoed)


def test_real_commands_cover_every_command_type() -> None:
    assert {c["type"] for c in REAL_COMMANDS} == command_types()


@pytest.mark.parametrize(
    ("command_type", "change", "complaint"),
    [
        (CommandType.PROVISION, lambda d: d.pop("slug"), "slug"),
        (CommandType.PROVISION, lambda d: d.pop("plan"), "plan"),
        (CommandType.RETRY, lambda d: d.update(force="yes"), "force"),
        (CommandType.RESET, lambda d: d.update(slug=""), "slug"),
        (CommandType.DECOMMISSION, lambda d: d.update(requested_by=7), "requested_by"),
    ],
)
def test_a_command_the_listener_refuses_fails_too(
    command_type: CommandType, change: Any, complaint: str
) -> None:
    raw = command(
        command_type, **({"plan": "pro"} if command_type is CommandType.PROVISION else {})
    )
    change(raw["data"])
    with pytest.raises(MalformedCommand):
        parse_command(json.dumps(raw), CLOUDEVENTS_CONTENT_TYPE)
    with pytest.raises(AssertionError, match=complaint):
        validate_command(raw)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda c: c.update(type="tenant.explode"), "not a message"),
        (lambda c: c.update(type="tenant.provisioning.started"), "event"),
        (lambda c: c.pop("specversion"), "specversion"),
        (lambda c: c.pop("id"), "id"),
        (lambda c: c.update(data={"slug": "Bad Slug", "plan": "pro"}), "Bad Slug"),
        (lambda c: c.update(data={"slug": SLUG, "plan": "gold"}), "gold"),
    ],
)
def test_a_wrong_command_fails(change: Any, complaint: str) -> None:
    raw = command(CommandType.PROVISION, plan="pro")
    change(raw)
    with pytest.raises(AssertionError, match=complaint):
        validate_command(raw)


def test_the_document_is_loaded_once() -> None:
    assert asyncapi.load_document() is asyncapi.load_document()
    assert asyncapi.catalog() is asyncapi.catalog()


def test_the_document_is_plain_yaml() -> None:
    # no anchors or aliases: other AsyncAPI tools read it the same way
    text = (ROOT / "docs" / "asyncapi.yaml").read_text(encoding="utf-8")
    for token in yaml.scan(text):
        assert not isinstance(token, yaml.AnchorToken | yaml.AliasToken), token
