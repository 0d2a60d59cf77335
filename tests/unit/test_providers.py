"""The real local providers against a temporary data dir and a temporary SQLite database."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine
from sqlmodel import Session, SQLModel, select

import service.db.models  # registers the tables on SQLModel.metadata
from sagas.errors import FatalUpstreamError, SlotTaken, TransientUpstreamError, ValidationFailure
from sagas.steps import STEPS
from service.db.engine import make_engine
from service.providers import certificates
from service.providers.activate import ActivateProvider
from service.providers.base import Provider, StepContext
from service.providers.certificates import CertificateProvider
from service.providers.console import AdminConsoleProvider
from service.providers.readiness import CHECKED_STEPS
from service.providers.registry import build_providers
from service.providers.slot import SlotProvider
from service.providers.storage import StorageProvider
from service.providers.validate import ValidateProvider
from service.providers.workflows import WorkflowRegistryProvider

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    SQLModel.metadata.create_all(engine)
    return engine


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def make_ctx(
    data_dir: Path, slug: str = "acme-corp", plan: str = "pro", tenant_id: str | None = None
) -> StepContext:
    """A fresh tenant (a new uuid) unless ``tenant_id`` is given."""
    return StepContext(
        tenant_id=tenant_id or str(uuid.uuid4()),
        slug=slug,
        plan=plan,
        admin_email="admin@acme.test",
        attempt_number=1,
        data_dir=data_dir,
        console_url=f"http://127.0.0.1:8080/console/{slug}",
    )


# Each lifecycle-tested provider, made fresh per test (the slot one needs the engine).
LIFECYCLE: dict[str, Callable[[Engine], Provider]] = {
    "reserve_slot": SlotProvider,
    "provision_storage": lambda _engine: StorageProvider(),
    "register_workflows": lambda _engine: WorkflowRegistryProvider(),
    "issue_certificate": lambda _engine: CertificateProvider(),
    "configure_admin_console": lambda _engine: AdminConsoleProvider(),
}


@pytest.mark.parametrize("step", list(LIFECYCLE))
def test_run_exists_compensate_lifecycle(step: str, engine: Engine, data_dir: Path) -> None:
    provider = LIFECYCLE[step](engine)
    assert provider.step == step
    ctx = make_ctx(data_dir)
    output = provider.run(ctx)
    json.dumps(output)  # outputs are stored as JSON
    assert provider.exists(ctx, output) is True
    assert provider.run(ctx) == output  # a redelivered step makes nothing new
    assert provider.exists(ctx, output) is True
    provider.compensate(ctx, output)
    assert provider.exists(ctx, output) is False
    provider.compensate(ctx, output)  # nothing left to undo is fine
    assert provider.exists(ctx, output) is False
    # Undone work can be made again.
    again = provider.run(ctx)
    assert provider.exists(ctx, again) is True


@pytest.mark.parametrize("step", [s for s in LIFECYCLE if s != "reserve_slot"])
def test_output_paths_are_relative_files_under_data_dir(
    step: str, engine: Engine, data_dir: Path
) -> None:
    ctx = make_ctx(data_dir)
    output = LIFECYCLE[step](engine).run(ctx)
    paths = [v for k, v in output.items() if k.endswith("path") or k == "console_config"]
    assert paths
    for rel in paths:
        assert not Path(rel).is_absolute()
        assert ctx.tenant_id in rel
        assert (data_dir / rel).exists()


def test_compensate_with_nothing_ever_made(engine: Engine, data_dir: Path) -> None:
    ctx = make_ctx(data_dir)
    for make in LIFECYCLE.values():
        make(engine).compensate(ctx, {})
    ActivateProvider().compensate(ctx, {})


# --- validate ---
@pytest.mark.parametrize(
    "slug",
    [
        "../etc",
        "AB",
        "a",
        "ab",
        "x'; DROP TABLE",
        "café",
        "\uff41\uff42\uff43",  # fullwidth "abc"
        "acme\n",
        "1acme",
        "-acme",
        "acme corp",
        "acme/corp",
        "",
        "a" * 64,
    ],
)
def test_validate_rejects_bad_slugs(slug: str, data_dir: Path) -> None:
    ctx = make_ctx(data_dir, slug=slug)
    with pytest.raises(ValidationFailure, match="slug"):
        ValidateProvider().run(ctx)
    assert ValidateProvider().exists(ctx, {"slug": slug, "plan": "pro"}) is False
    assert not data_dir.exists()  # nothing touched the filesystem


@pytest.mark.parametrize("plan", ["gold", "", "PRO", "free "])
def test_validate_rejects_unknown_plans(plan: str, data_dir: Path) -> None:
    with pytest.raises(ValidationFailure, match="plan"):
        ValidateProvider().run(make_ctx(data_dir, plan=plan))


def test_validate_accepts_and_is_not_retryable(data_dir: Path) -> None:
    ctx = make_ctx(data_dir, slug="abc", plan="free")
    output = ValidateProvider().run(ctx)
    assert output == {"slug": "abc", "plan": "free"}
    assert ValidateProvider().exists(ctx, output) is True
    ValidateProvider().run(make_ctx(data_dir, slug="a" + "b" * 62, plan="enterprise"))
    assert ValidationFailure("x").retryable is False


# --- reserve_slot ---
def test_slot_taken_by_another_tenant(engine: Engine, data_dir: Path) -> None:
    provider = SlotProvider(engine)
    owner = make_ctx(data_dir)
    other = make_ctx(data_dir)
    output = provider.run(owner)
    with pytest.raises(SlotTaken, match="acme-corp"):
        provider.run(other)
    assert provider.exists(other, output) is False
    provider.compensate(other, output)  # may not free someone else's slot
    assert provider.exists(owner, output) is True
    provider.compensate(owner, output)
    assert provider.run(other) == {"slot": "acme-corp"}  # free again after release


def test_slot_race_has_exactly_one_winner(engine: Engine, data_dir: Path) -> None:
    provider = SlotProvider(engine)
    contenders = [make_ctx(data_dir) for _ in range(6)]
    barrier = threading.Barrier(len(contenders))
    outcomes: dict[str, str] = {}

    def reserve(ctx: StepContext) -> None:
        barrier.wait()
        try:
            provider.run(ctx)
            outcomes[ctx.tenant_id] = "won"
        except SlotTaken:
            outcomes[ctx.tenant_id] = "taken"

    threads = [threading.Thread(target=reserve, args=(ctx,)) for ctx in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes.values()) == ["taken"] * 5 + ["won"]
    with Session(engine) as session:
        rows = session.exec(select(service.db.models.Slot)).all()
    assert [(r.slug, outcomes[r.tenant_id]) for r in rows] == [("acme-corp", "won")]


# --- provision_storage ---
def test_storage_layout_and_damage(data_dir: Path) -> None:
    provider = StorageProvider()
    ctx = make_ctx(data_dir)
    output = provider.run(ctx)
    root = data_dir / "storage" / ctx.tenant_id
    assert output == {"storage_id": ctx.tenant_id, "path": f"storage/{ctx.tenant_id}"}
    assert (root / "users").is_dir()
    assert (root / "keys").is_dir()
    metadata = json.loads((root / "tenant.json").read_text())
    assert metadata["tenant_id"] == ctx.tenant_id
    assert (metadata["slug"], metadata["plan"]) == ("acme-corp", "pro")
    datetime.fromisoformat(metadata["created_at"])
    provider.run(ctx)
    assert json.loads((root / "tenant.json").read_text()) == metadata  # rerun keeps it
    # A metadata file naming another tenant is not this tenant's storage.
    (root / "tenant.json").write_text(json.dumps({**metadata, "tenant_id": "someone-else"}))
    assert provider.exists(ctx, output) is False
    # Nor is a half-written (unparseable) one.
    (root / "tenant.json").write_text('{"tenant_id": ')
    assert provider.exists(ctx, output) is False
    provider.run(ctx)
    assert provider.exists(ctx, output) is True


def test_unsafe_tenant_id_touches_nothing(data_dir: Path) -> None:
    ctx = make_ctx(data_dir, tenant_id="../escape")
    with pytest.raises(FatalUpstreamError, match="safe path component"):
        StorageProvider().run(ctx)
    assert not data_dir.exists()


# --- register_workflows ---
def test_workflow_registration_is_reused(data_dir: Path) -> None:
    provider = WorkflowRegistryProvider()
    ctx = make_ctx(data_dir)
    output = provider.run(ctx)
    path = data_dir / output["path"]
    assert output["path"] == f"registry/{ctx.tenant_id}.json"
    registration = json.loads(path.read_text())
    assert registration["registration_id"] == output["registration_id"]
    uuid.UUID(registration["registration_id"])
    assert registration["workflows"] == ["signup", "login", "password-reset", "mfa-enrolment"]
    assert (registration["tenant_id"], registration["slug"]) == (ctx.tenant_id, "acme-corp")
    assert provider.run(ctx)["registration_id"] == output["registration_id"]
    assert provider.exists(ctx, {**output, "registration_id": str(uuid.uuid4())}) is False
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp files left over


# --- issue_certificate ---
def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certificate_chains_to_the_local_ca(data_dir: Path) -> None:
    ctx = make_ctx(data_dir)
    output = CertificateProvider().run(ctx)
    cert = _load_cert(data_dir / output["cert_path"])
    ca_cert = _load_cert(data_dir / "ca" / "ca.crt")
    ca_key = ca_cert.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert ca_key.curve.name == "secp256r1"
    assert cert.signature_hash_algorithm is not None
    ca_key.verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )
    cert.verify_directly_issued_by(ca_cert)
    ca_cert.verify_directly_issued_by(ca_cert)  # self-signed
    constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["acme-corp.tenants.local"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=89) < lifetime <= timedelta(days=90)
    assert output["serial"] == format(cert.serial_number, "x")
    assert datetime.fromisoformat(output["not_after"]) == cert.not_valid_after_utc
    key_path = data_dir / output["key_path"]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / "ca" / "ca.key").stat().st_mode) == 0o600
    assert output["key_path"] == f"certs/{ctx.tenant_id}/tls.key"


def test_certificate_not_signed_by_the_ca_does_not_exist(data_dir: Path) -> None:
    provider = CertificateProvider()
    ctx = make_ctx(data_dir)
    output = provider.run(ctx)
    # A new CA (the old one lost): the tenant's certificate no longer chains to it.
    os.remove(data_dir / "ca" / "ca.crt")
    os.remove(data_dir / "ca" / "ca.key")
    assert provider.exists(ctx, output) is False
    reissued = provider.run(ctx)
    assert reissued["serial"] != output["serial"]
    assert provider.exists(ctx, reissued) is True
    assert provider.exists(ctx, output) is False  # the serial is the old one


def test_certificate_with_a_mismatched_key_is_reissued(data_dir: Path) -> None:
    provider = CertificateProvider()
    ctx = make_ctx(data_dir)
    output = provider.run(ctx)
    other = provider.run(make_ctx(data_dir))
    # The tenant's key replaced, as a crash between key and certificate writes would leave it.
    (data_dir / output["key_path"]).write_bytes((data_dir / other["key_path"]).read_bytes())
    assert provider.exists(ctx, output) is False
    assert provider.run(ctx)["serial"] != output["serial"]


def test_ca_created_once_when_threads_race(data_dir: Path) -> None:
    ca_dir = data_dir / "ca"
    barrier = threading.Barrier(8)
    serials: list[int] = []

    def load() -> None:
        barrier.wait()
        # Past the per-process cache, straight at the file lock.
        ca = certificates._load_or_create_ca_files(ca_dir, create=True)
        assert ca is not None
        serials.append(ca.cert.serial_number)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(serials) == 8
    assert len(set(serials)) == 1
    assert _load_cert(ca_dir / "ca.crt").serial_number == serials[0]
    # The cached path agrees with what is on disk.
    ca = certificates.load_ca(data_dir, create=True)
    assert ca is not None
    assert ca.cert.serial_number == serials[0]


def test_ca_created_once_when_processes_race(data_dir: Path) -> None:
    script = (
        "import sys; from pathlib import Path; "
        "from service.providers.certificates import load_ca; "
        "print(format(load_ca(Path(sys.argv[1]), create=True).cert.serial_number, 'x'))"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(data_dir)],
            stdout=subprocess.PIPE,
            cwd=PROJECT_ROOT,
            env=env,
            text=True,
        )
        for _ in range(4)
    ]
    serials = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert serials == {format(_load_cert(data_dir / "ca" / "ca.crt").serial_number, "x")}


# --- configure_admin_console ---
def test_console_config(data_dir: Path) -> None:
    provider = AdminConsoleProvider()
    ctx = make_ctx(data_dir)
    output = provider.run(ctx)
    assert output == {
        "console_config": f"console/{ctx.tenant_id}.json",
        "admin_console_url": ctx.console_url,
    }
    config = json.loads((data_dir / output["console_config"]).read_text())
    assert config["admin_console_url"] == ctx.console_url
    assert config["admin_email"] == "admin@acme.test"
    assert provider.exists(ctx, {**output, "admin_console_url": "http://elsewhere"}) is False


# --- check_readiness and activate, over the whole registry ---
def _provision(engine: Engine, data_dir: Path) -> tuple[dict[str, Provider], StepContext]:
    providers = build_providers(engine)
    ctx = make_ctx(data_dir)
    outputs: dict[str, dict[str, object]] = {}
    for step in STEPS:
        ctx = dataclasses.replace(ctx, outputs=dict(outputs))
        outputs[step] = providers[step].run(ctx)
    return providers, dataclasses.replace(ctx, outputs=dict(outputs))


def test_registry_covers_every_step_in_order(engine: Engine) -> None:
    providers = build_providers(engine)
    assert list(providers) == list(STEPS)
    assert all(providers[step].step == step for step in STEPS)


def test_full_provisioning_then_activation(engine: Engine, data_dir: Path) -> None:
    providers, ctx = _provision(engine, data_dir)
    assert ctx.outputs["check_readiness"] == {"checked": list(CHECKED_STEPS)}
    registration = json.loads((data_dir / "registry" / f"{ctx.tenant_id}.json").read_text())
    assert registration["active"] is True
    assert registration["activated_at"] == ctx.outputs["activate"]["activated_at"]
    activate = providers["activate"]
    assert activate.run(ctx) == ctx.outputs["activate"]  # idempotent
    assert activate.exists(ctx, ctx.outputs["activate"]) is True
    activate.compensate(ctx, ctx.outputs["activate"])
    assert activate.exists(ctx, ctx.outputs["activate"]) is False
    activate.compensate(ctx, ctx.outputs["activate"])
    # The registration itself survives deactivation.
    workflows = providers["register_workflows"]
    assert workflows.exists(ctx, ctx.outputs["register_workflows"]) is True
    workflows.compensate(ctx, ctx.outputs["register_workflows"])
    activate.compensate(ctx, ctx.outputs["activate"])  # the file gone is fine
    with pytest.raises(TransientUpstreamError, match="registration"):
        activate.run(ctx)


@pytest.mark.parametrize("step", CHECKED_STEPS)
def test_readiness_fails_when_earlier_work_is_gone(
    step: str, engine: Engine, data_dir: Path
) -> None:
    providers, ctx = _provision(engine, data_dir)
    readiness = providers["check_readiness"]
    assert readiness.run(ctx) == {"checked": list(CHECKED_STEPS)}
    providers[step].compensate(ctx, ctx.outputs[step])
    with pytest.raises(TransientUpstreamError, match=step) as raised:
        readiness.run(ctx)
    assert raised.value.retryable is True
    others = [s for s in CHECKED_STEPS if s != step]
    assert not any(other in str(raised.value) for other in others)


def test_readiness_fails_when_an_output_is_missing(engine: Engine, data_dir: Path) -> None:
    providers, ctx = _provision(engine, data_dir)
    outputs = {k: v for k, v in ctx.outputs.items() if k != "issue_certificate"}
    with pytest.raises(TransientUpstreamError, match="issue_certificate"):
        providers["check_readiness"].run(dataclasses.replace(ctx, outputs=outputs))


def test_readiness_fails_when_storage_folder_is_deleted(engine: Engine, data_dir: Path) -> None:
    providers, ctx = _provision(engine, data_dir)
    for child in (data_dir / "storage" / ctx.tenant_id / "users").iterdir():
        child.unlink()
    (data_dir / "storage" / ctx.tenant_id / "users").rmdir()
    with pytest.raises(TransientUpstreamError, match="provision_storage"):
        providers["check_readiness"].run(ctx)
