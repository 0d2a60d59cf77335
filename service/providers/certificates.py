"""issue_certificate: a TLS key and certificate for ``<slug>.tenants.local``, from a local CA."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.providers.base import Output, StepContext
from service.providers.files import (
    exclusive_lock,
    file_identity,
    relative_to,
    remove_tree,
    tenant_path_component,
    write_bytes_atomically,
)

CERT_VALIDITY = timedelta(days=90)
CA_VALIDITY = timedelta(days=3650)
# Backdated a little, so a peer whose clock lags still accepts a fresh certificate.
CLOCK_SKEW = timedelta(minutes=5)
# A rerun reissues rather than hand out a certificate about to lapse.
RENEW_BEFORE = timedelta(days=1)


def tenant_dns_name(slug: str) -> str:
    return f"{slug}.tenants.local"


@dataclass(frozen=True, slots=True)
class LocalCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


# Per process, keyed by CA folder; an entry is trusted only while ca.crt is the same file.
_ca_cache: dict[Path, tuple[tuple[int, int, int], LocalCA]] = {}
_ca_cache_lock = threading.Lock()


def load_ca(data_dir: Path, *, create: bool) -> LocalCA | None:
    """The data dir's CA; made on first use when ``create``, else None when there is none."""
    ca_dir = (data_dir / "ca").resolve()
    with _ca_cache_lock:
        cached = _ca_cache.get(ca_dir)
        if cached is not None and cached[0] == file_identity(ca_dir / "ca.crt"):
            return cached[1]
        if not create and not ca_dir.is_dir():
            return None
        ca = _load_or_create_ca_files(ca_dir, create=create)
        stamp = file_identity(ca_dir / "ca.crt")
        if ca is not None and stamp is not None:
            _ca_cache[ca_dir] = (stamp, ca)
        return ca


def _load_or_create_ca_files(ca_dir: Path, *, create: bool) -> LocalCA | None:
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # flock, not lockf: it also excludes threads of one process holding separate descriptors.
    with exclusive_lock(ca_dir / ".lock"):
        pair = _read_key_and_cert(ca_dir / "ca.key", ca_dir / "ca.crt")
        if pair is not None and _valid_at(pair[1], datetime.now(UTC)):
            return LocalCA(key=pair[0], cert=pair[1])
        if not create:
            return None
        ca = _generate_ca()
        # The key first: a crash before the certificate leaves no ca.crt, so the next run
        # (under this lock) sees no usable CA and makes a fresh pair.
        write_bytes_atomically(ca_dir / "ca.key", _key_pem(ca.key), mode=0o600)
        write_bytes_atomically(ca_dir / "ca.crt", ca.cert.public_bytes(serialization.Encoding.PEM))
        return ca


def _generate_ca() -> LocalCA:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _common_name("Tenant Provisioner Local CA")
    cert = (
        _builder(name, name, key, CA_VALIDITY, is_ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return LocalCA(key=key, cert=cert)


class CertificateProvider:
    step: str = "issue_certificate"

    def run(self, ctx: StepContext) -> Output:
        ca = load_ca(ctx.data_dir, create=True)
        assert ca is not None  # create=True always yields a CA
        key_path, cert_path = _tenant_paths(ctx)
        renew_at = datetime.now(UTC) + RENEW_BEFORE
        pair = _read_key_and_cert(key_path, cert_path)
        if pair is not None and _issued_for(pair[1], ctx.slug, ca, renew_at):
            return _output(ctx, pair[1])
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(key, ctx.slug, ca)
        key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The key first: until the matching certificate lands, the pair does not match, so
        # neither exists nor a rerun accepts it.
        write_bytes_atomically(key_path, _key_pem(key), mode=0o600)
        write_bytes_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return _output(ctx, cert)

    def exists(self, ctx: StepContext, output: Output) -> bool:
        ca = load_ca(ctx.data_dir, create=False)
        pair = _read_key_and_cert(*_tenant_paths(ctx))
        if ca is None or pair is None:
            return False
        cert = pair[1]
        serial = output.get("serial")
        return (
            isinstance(serial, str)
            and format(cert.serial_number, "x") == serial.lower()
            and _issued_for(cert, ctx.slug, ca, datetime.now(UTC))
        )

    def compensate(self, ctx: StepContext, output: Output) -> None:
        remove_tree(_tenant_paths(ctx)[0].parent)


def _issue(key: ec.EllipticCurvePrivateKey, slug: str, ca: LocalCA) -> x509.Certificate:
    dns_name = tenant_dns_name(slug)
    issuer_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    return (
        _builder(_common_name(dns_name), ca.cert.subject, key, CERT_VALIDITY, is_ca=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(issuer_key_id, critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    validity: timedelta,
    *,
    is_ca: bool,
) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    # A CA only signs certificates; a tenant's key only signs TLS handshakes (ECDHE).
    usage = x509.KeyUsage(
        digital_signature=not is_ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=is_ca,
        crl_sign=is_ca,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), True)
        .add_extension(usage, critical=True)
    )


def _common_name(value: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def _issued_for(cert: x509.Certificate, slug: str, ca: LocalCA, valid_at: datetime) -> bool:
    """Whether ``cert`` is this CA's, for this slug, and valid at ``valid_at``."""
    try:
        cert.verify_directly_issued_by(ca.cert)  # issuer name and signature
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    dns_names = names.get_values_for_type(x509.DNSName)
    return tenant_dns_name(slug) in dns_names and _valid_at(cert, valid_at)


def _valid_at(cert: x509.Certificate, moment: datetime) -> bool:
    return cert.not_valid_before_utc <= moment < cert.not_valid_after_utc


def _read_key_and_cert(
    key_path: Path, cert_path: Path
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The key and certificate, or None when either is missing, unreadable or they differ."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (FileNotFoundError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        return None
    return key, cert


def _tenant_paths(ctx: StepContext) -> tuple[Path, Path]:
    folder = ctx.data_dir / "certs" / tenant_path_component(ctx.tenant_id)
    return folder / "tls.key", folder / "tls.crt"


def _output(ctx: StepContext, cert: x509.Certificate) -> Output:
    key_path, cert_path = _tenant_paths(ctx)
    return {
        "serial": format(cert.serial_number, "x"),
        "cert_path": relative_to(ctx.data_dir, cert_path),
        "key_path": relative_to(ctx.data_dir, key_path),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
