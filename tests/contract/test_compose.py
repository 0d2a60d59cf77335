"""docker-compose.yml: valid Compose, and consistent with the contract and the code.

No Docker engine runs here, so the file is checked statically: against the Compose
Specification's JSON schema (vendored, see schemas/README.md), then for what the schema cannot
know: that the commands exist, the settings are the contract's, the values pass the settings'
own validation, and the services wait for, mount and publish what they use.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA_FILE = Path(__file__).with_name("schemas") / "compose-spec.json"
# shared/ sits beside the repository (the work tree, and CI's clone alike).
CONTRACT_CANDIDATES = (ROOT.parent / "shared" / "contract.md", ROOT / "shared" / "contract.md")

APP_SERVICES = ("worker", "listener", "relay", "audit", "api", "flower")
# Long-running commands the contract does not list but the CLI has (the outbox relay).
EXTRA_CLI_COMMANDS = frozenset({"relay"})
# Official images the stack needs, by name and tag.
INFRA_IMAGES = {"redis": "redis:7", "postgres": "postgres:16", "rabbitmq": "rabbitmq:3-management"}
# Compose interpolation: $$ (a literal $), ${NAME...} and $NAME.
INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<rest>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
# A Docker image reference: [registry/][namespace/]name[:tag][@digest].
IMAGE_REFERENCE = re.compile(
    r"^(?:[a-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)


# --- loading ---
@cache
def compose_text() -> str:
    return COMPOSE_FILE.read_text(encoding="utf-8")


def compose() -> dict[str, Any]:
    # A fresh copy each time: tests must not see each other's changes. safe_load resolves the
    # x-provisioner anchors and `<<` merge keys the way Compose does.
    document = yaml.safe_load(compose_text())
    assert isinstance(document, dict)
    return document


def services() -> dict[str, dict[str, Any]]:
    declared: dict[str, dict[str, Any]] = compose()["services"]
    return declared


def command_argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {pair[0]: pair[1] if len(pair) == 2 else "" for pair in pairs}
    return {key: "" if value is None else str(value) for key, value in env.items()}


def interpolate_defaults(value: str) -> str:
    """What Compose makes of ``value`` with no variable set in the shell or an .env file."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        rest = match["rest"] or ""
        for operator in (":-", "-"):
            if rest.startswith(operator):
                return rest[len(operator) :]
        return ""

    return INTERPOLATION.sub(replace, value)


def interpolations(text: str) -> Iterator[tuple[str, str]]:
    """(variable, modifier) for every ``${VAR...}``/``$VAR`` in ``text``; ``$$`` is no variable."""
    for match in INTERPOLATION.finditer(text):
        if match["escaped"]:
            continue
        yield (match["braced"] or match["bare"], match["rest"] or "")


# --- the contract ---
def contract_text() -> str:
    for candidate in CONTRACT_CANDIDATES:
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    pytest.skip(
        f"shared/contract.md not found (looked at {', '.join(map(str, CONTRACT_CANDIDATES))})"
    )


def contract_section(heading_prefix: str) -> str:
    lines = contract_text().splitlines()
    start = next(
        (i for i, line in enumerate(lines) if line.startswith(f"## {heading_prefix}")), None
    )
    assert start is not None, f"contract.md has no '## {heading_prefix}' section"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start + 1 : end])


def contract_cli_commands() -> set[str]:
    spans = re.findall(r"`([^`]+)`", contract_section("Operator CLI"))
    commands = {span.split()[0] for span in spans}
    commands = {name for name in commands if re.fullmatch(r"[a-z][a-z-]*", name)}
    # Guard the parsing itself: these are the long-running processes the contract names.
    assert {"up", "worker", "listen", "consume", "api"} <= commands, commands
    return commands


def contract_settings() -> set[str]:
    names = set(re.findall(r"`(PROVISIONER_[A-Z0-9_]+)`", contract_section("Settings")))
    assert {"PROVISIONER_BROKER_URL", "PROVISIONER_DATABASE_URL"} <= names, names
    return names


# --- the schema ---
def test_the_vendored_schema_is_a_valid_json_schema() -> None:
    schema = yaml.safe_load(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    assert schema["title"] == "Compose Specification"


def test_compose_file_matches_the_compose_specification() -> None:
    schema = yaml.safe_load(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(compose()), key=lambda error: list(error.path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, error.path)) or '(root)'}: {error.message}" for error in errors
    )


def test_the_schema_rejects_a_broken_file() -> None:
    # The schema test above is worth something only if the schema catches mistakes.
    broken = compose()
    broken["services"]["worker"]["depends_on"] = {"redis": {"condition": "service_ready"}}
    broken["services"]["api"]["restrat"] = "always"
    schema = yaml.safe_load(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert len(list(validator.iter_errors(broken))) >= 2


# --- commands ---
def test_the_app_services_are_all_there() -> None:
    declared = services()
    missing = [name for name in APP_SERVICES if name not in declared]
    assert not missing, f"app services missing from docker-compose.yml: {missing}"
    for name in APP_SERVICES:
        assert command_argv(declared[name]), f"{name} has no command"


def test_provisioner_commands_are_the_contracts() -> None:
    allowed = contract_cli_commands() | EXTRA_CLI_COMMANDS
    used = {
        name: argv[1] if len(argv) > 1 else None
        for name, service in services().items()
        if (argv := command_argv(service)) and argv[0] == "provisioner"
    }
    assert used, "no service runs `provisioner ...`"
    unknown = {name: sub for name, sub in used.items() if sub not in allowed}
    assert not unknown, f"commands not in the contract's CLI section: {unknown}"


def test_registered_commands_accept_the_options_used() -> None:
    """Where the CLI already has the command, its options parse (consume/api may come later)."""
    import typer.main

    from service.cli import app

    group = typer.main.get_command(app)
    registered: dict[str, Any] = group.commands  # type: ignore[attr-defined]
    checked = 0
    for service in services().values():
        argv = command_argv(service)
        if len(argv) < 2 or argv[0] != "provisioner" or argv[1] not in registered:
            continue
        # Parses and validates the arguments without running the command.
        registered[argv[1]].make_context(argv[1], argv[2:])
        checked += 1
    assert checked, "no service runs a command the CLI registers"


def test_flower_and_worker_use_the_celery_app_module() -> None:
    argv = command_argv(services()["flower"])
    assert argv[:1] == ["celery"]
    app_option = next(
        (argv[i + 1] for i, part in enumerate(argv[:-1]) if part in {"--app", "-A"}), None
    )
    assert app_option == "tasks.app"
    assert (ROOT / "tasks" / "app.py").is_file()
    assert "--port=5555" in argv
    assert "5555" in " ".join(map(str, services()["flower"].get("ports", [])))


# --- settings ---
def test_only_contract_settings_are_used() -> None:
    allowed = contract_settings()
    used: set[str] = set()
    for service in services().values():
        used |= {key for key in environment(service) if key.startswith("PROVISIONER_")}
    used |= {name for name, _ in interpolations(compose_text()) if name.startswith("PROVISIONER_")}
    assert used, "no PROVISIONER_* variable in docker-compose.yml"
    unknown = sorted(used - allowed)
    assert not unknown, f"PROVISIONER_* variables not in the contract's settings: {unknown}"


def test_settings_are_fields_of_the_settings_class() -> None:
    from config.settings import ENV_PREFIX, Settings

    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    for name, service in services().items():
        unknown = {key for key in environment(service) if key.startswith(ENV_PREFIX)} - fields
        assert not unknown, f"{name}: not settings of config.settings.Settings: {unknown}"


def test_every_interpolation_has_a_default() -> None:
    # `docker compose up` with nothing set in the shell must work, without warnings.
    bare = sorted(
        {name for name, rest in interpolations(compose_text()) if not rest.startswith((":-", "-"))}
    )
    assert not bare, f"variables without a default: {bare}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_environment_passes_the_settings_validation(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from config.settings import ENV_PREFIX, Settings

    env = {key: interpolate_defaults(value) for key, value in environment(services()[name]).items()}
    for key in [key for key in os.environ if key.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in settings.database_url
    assert settings.api_token is None  # no token unless the operator sets one
    assert str(settings.data_dir) == "/srv/var"


def test_rabbitmq_broker_url_in_the_comments_is_valid() -> None:
    from config.settings import Settings

    urls = set(re.findall(r"amqp://\S+", compose_text()))
    assert urls == {"amqp://guest:guest@rabbitmq:5672//"}
    assert Settings(broker_url=urls.pop()).broker_url.startswith("amqp://")


# --- wiring ---
def test_app_services_share_one_image_built_from_the_dockerfile() -> None:
    declared = services()
    images = {declared[name].get("image") for name in APP_SERVICES}
    assert len(images) == 1, images
    for name in APP_SERVICES:
        build = declared[name].get("build")
        assert isinstance(build, dict), f"{name} is not built from the repository"
        assert (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).is_file()
    assert "x-provisioner" in compose()


def test_dependencies_exist_and_have_healthchecks() -> None:
    declared = services()
    for name, service in declared.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {target: {"condition": "service_started"} for target in depends}
        for target, condition in depends.items():
            assert target in declared, f"{name} depends on unknown service {target}"
            assert not declared[target].get("profiles") or service.get("profiles"), (
                f"{name} is always on but depends on {target}, which is only in a profile"
            )
            if condition.get("condition") == "service_healthy":
                assert declared[target].get("healthcheck"), f"{target} has no healthcheck"
    for name in APP_SERVICES:
        depends = declared[name].get("depends_on") or {}
        for target in ("redis", "postgres"):
            assert depends.get(target, {}).get("condition") == "service_healthy", (name, target)


def test_redis_is_not_persisted_and_answers_ping() -> None:
    redis_service = services()["redis"]
    argv = command_argv(redis_service)
    assert argv[0] == "redis-server"
    assert argv[argv.index("--save") + 1] == ""
    assert argv[argv.index("--appendonly") + 1] == "no"
    assert "ping" in redis_service["healthcheck"]["test"]


def test_postgres_database_matches_the_database_url() -> None:
    postgres = services()["postgres"]
    env = environment(postgres)
    url = environment(services()["worker"])["PROVISIONER_DATABASE_URL"]
    user = env.get("POSTGRES_USER", "postgres")
    password = env.get("POSTGRES_PASSWORD")
    database = env.get("POSTGRES_DB", user)
    assert database == "provisioner"
    trust = env.get("POSTGRES_HOST_AUTH_METHOD") == "trust"
    assert password or trust
    credentials = user if trust and not password else f"{user}:{password}"
    assert url == f"postgresql+psycopg://{credentials}@postgres:5432/{database}"
    assert postgres.get("healthcheck")


def test_infrastructure_images_are_official_names() -> None:
    declared = services()
    for name, image in INFRA_IMAGES.items():
        assert declared[name]["image"] == image
        assert IMAGE_REFERENCE.match(image), image
    for name, service in declared.items():
        if "image" in service:
            assert IMAGE_REFERENCE.match(service["image"]), f"{name}: {service['image']!r}"


def test_rabbitmq_is_opt_in_behind_a_profile() -> None:
    declared = services()
    assert "rabbitmq" in declared["rabbitmq"].get("profiles", [])
    # Nothing else is behind a profile: the default stack is complete on its own.
    assert [name for name, s in declared.items() if s.get("profiles")] == ["rabbitmq"]
    default_broker = interpolate_defaults(environment(declared["worker"])["PROVISIONER_BROKER_URL"])
    assert default_broker.startswith("redis://redis:")


def test_named_volumes_are_declared_and_the_data_dir_is_mounted() -> None:
    document = compose()
    declared_volumes = set(document.get("volumes") or {})
    for name, service in document["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith((".", "/", "~")):
                assert source in declared_volumes, f"{name} mounts undeclared volume {source}"
        data_dir = environment(service).get("PROVISIONER_DATA_DIR")
        if data_dir:
            targets = {
                v.split(":")[1] if isinstance(v, str) else v.get("target")
                for v in service.get("volumes", [])
            }
            assert data_dir in targets, f"{name}: PROVISIONER_DATA_DIR {data_dir} is not a volume"
    worker_data = set(document["services"]["worker"]["volumes"])
    assert worker_data & set(document["services"]["api"]["volumes"]), "worker/api share no data"


def test_api_listens_where_it_is_published() -> None:
    api = services()["api"]
    bind = environment(api)["PROVISIONER_API_BIND"]
    host, _, port = bind.rpartition(":")
    assert ipaddress.ip_address(host).is_unspecified, (
        f"the API must listen on every interface: {bind}"
    )
    published = [str(p) for p in api.get("ports", [])]
    assert any(p.rsplit(":", 1)[-1] == port == "8080" for p in published), published


# --- the Dockerfile ---
def test_dockerfile_builds_the_package_as_a_non_root_user() -> None:
    lines = [
        line.strip()
        for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    instructions = [(line.split()[0].upper(), line.split(None, 1)[-1]) for line in lines]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert any(op == "RUN" and "pip install ." in arg for op, arg in instructions)
    workdirs = [arg for op, arg in instructions if op == "WORKDIR"]
    assert workdirs[-1] == "/srv"
    users = [arg for op, arg in instructions if op == "USER"]
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"the image runs as {users[-1]}"
    # Whatever the package needs at build time must be copied in.
    copied = " ".join(arg for op, arg in instructions if op == "COPY")
    for needed in ("pyproject.toml", "config", "sagas", "service", "tasks"):
        assert needed in copied, f"Dockerfile does not copy {needed}"
