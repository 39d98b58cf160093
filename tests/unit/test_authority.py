"""controlplane/ca/authority.py: the agent CA."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from testhide.agent.credentials import new_key_and_csr
from testhide.common.identity import AgentIdentity
from testhide.controlplane.ca.authority import (
    BACKDATE,
    DEV_MARKER,
    SERVER_BACKDATE,
    CertificateAuthority,
    is_development_ca,
    server_name_sans,
)
from testhide.controlplane.errors import InvalidArgument

IDENTITY = AgentIdentity("example.org", "acme", "linux", "a0011223344556677")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("example.org")


@pytest.fixture(scope="module")
def csr() -> tuple[bytes, bytes]:
    return new_key_and_csr()


def _csr_for(key: object) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def test_ca_certificate(ca: CertificateAuthority) -> None:
    cert = ca.certificate
    assert cert.subject == cert.issuer
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert ku.crl_sign
    assert not ku.digital_signature
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert "example.org" in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert not is_development_ca(cert)
    assert x509.load_pem_x509_certificate(ca.certificate_pem) == cert
    key = serialization.load_pem_private_key(ca.key_pem(), password=None)
    assert key.public_key() == cert.public_key()


def test_ca_lifetime_and_backdate() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    ca = CertificateAuthority.create("td", lifetime=timedelta(days=2))
    after = datetime.now(UTC)
    nb, na = ca.certificate.not_valid_before_utc, ca.certificate.not_valid_after_utc
    # CAs take the long backdate, so a client minutes behind accepts a new one.
    assert before - SERVER_BACKDATE <= nb <= after - SERVER_BACKDATE
    assert before + timedelta(days=2) <= na <= after + timedelta(days=2)


def test_issue_agent(ca: CertificateAuthority, csr: tuple[bytes, bytes]) -> None:
    key_pem, csr_pem = csr
    now = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    issued = ca.issue_agent(csr_pem, IDENTITY, timedelta(hours=12), now=now)
    cert = x509.load_pem_x509_certificate(issued.certificate_pem)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(IDENTITY.uri)]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert not bc.value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature

    assert cert.not_valid_before_utc == now - timedelta(seconds=30)
    assert cert.not_valid_after_utc == now + timedelta(hours=12)
    assert issued.not_after == cert.not_valid_after_utc
    assert issued.serial == cert.serial_number
    assert cert.issuer == ca.certificate.subject
    cert.verify_directly_issued_by(ca.certificate)

    key = serialization.load_pem_private_key(key_pem, password=None)
    assert cert.public_key() == key.public_key()
    assert AgentIdentity.from_certificate(cert) == IDENTITY


def test_issue_agent_default_now_is_current(ca: CertificateAuthority, csr: tuple[bytes, bytes]) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    issued = ca.issue_agent(csr[1], IDENTITY, timedelta(days=1))
    after = datetime.now(UTC)
    cert = x509.load_pem_x509_certificate(issued.certificate_pem)
    assert before - BACKDATE <= cert.not_valid_before_utc <= after - BACKDATE
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=1) + BACKDATE


def test_serials_are_unique(ca: CertificateAuthority, csr: tuple[bytes, bytes]) -> None:
    serials = {ca.issue_agent(csr[1], IDENTITY, timedelta(hours=1)).serial for _ in range(5)}
    assert len(serials) == 5


def test_csr_subject_and_extensions_are_ignored(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    evil = AgentIdentity("example.org", "victim", "prod", "a1")
    csr_pem = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(evil.uri)]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    issued = ca.issue_agent(csr_pem, IDENTITY, timedelta(hours=1))
    cert = x509.load_pem_x509_certificate(issued.certificate_pem)
    assert AgentIdentity.from_certificate(cert) == IDENTITY
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"agent {IDENTITY.agent_id}"


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        lambda: ec.generate_private_key(ec.SECP256K1()),
        lambda: ed25519.Ed25519PrivateKey.generate(),
    ],
    ids=["rsa2048", "p384", "secp256k1", "ed25519"],
)
def test_issue_agent_rejects_non_p256_keys(ca: CertificateAuthority, make_key: Callable[[], object]) -> None:
    with pytest.raises(InvalidArgument, match="P-256"):
        ca.issue_agent(_csr_for(make_key()), IDENTITY, timedelta(hours=1))


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"not a pem",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        b"-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n",
    ],
)
def test_issue_agent_rejects_garbage(ca: CertificateAuthority, garbage: bytes) -> None:
    with pytest.raises(InvalidArgument, match="not a PEM certificate signing request"):
        ca.issue_agent(garbage, IDENTITY, timedelta(hours=1))


def test_issue_agent_rejects_a_certificate_instead_of_a_csr(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidArgument):
        ca.issue_agent(ca.certificate_pem, IDENTITY, timedelta(hours=1))


def test_issue_agent_rejects_bad_csr_signature(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    good = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    # Swap in another key's public key, keeping the signature: valid DER, wrong signature.
    good_der = good.public_bytes(serialization.Encoding.DER)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    own, theirs = key.public_key().public_bytes(*spki), other.public_key().public_bytes(*spki)
    assert own in good_der
    assert len(own) == len(theirs)
    forged = x509.load_der_x509_csr(good_der.replace(own, theirs))
    assert not forged.is_signature_valid
    with pytest.raises(InvalidArgument, match="signature"):
        ca.issue_agent(forged.public_bytes(serialization.Encoding.PEM), IDENTITY, timedelta(hours=1))


def test_is_development_ca() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)

    def self_signed(org: str) -> x509.Certificate:
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                x509.NameAttribute(NameOID.COMMON_NAME, "ca"),
            ]
        )
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256())
        )

    assert is_development_ca(self_signed(DEV_MARKER))
    assert is_development_ca(self_signed(f"acme {DEV_MARKER} ci"))
    assert not is_development_ca(self_signed("testhide"))
    assert not is_development_ca(self_signed("testhide development"))
    dev = CertificateAuthority(self_signed(DEV_MARKER), key, "dev.local")
    assert is_development_ca(dev.certificate)
    # A development CA still signs: its issued certificates chain to it.
    leaf = x509.load_pem_x509_certificate(
        dev.issue_agent(
            new_key_and_csr()[1], AgentIdentity("dev.local", "o", "p", "a"), timedelta(hours=1)
        ).certificate_pem
    )
    leaf.verify_directly_issued_by(dev.certificate)


def test_server_names_become_dns_and_ip_sans_and_anything_else_is_refused() -> None:
    sans = server_name_sans(
        ["cp1.example.org", "*.replicas.example.org", "[::1]", "10.0.0.2", "cp1.example.org"]
    )
    assert sans == [
        x509.DNSName("cp1.example.org"),
        x509.DNSName("*.replicas.example.org"),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.2")),
    ]
    for bad in [
        "cp.example.org:7443",
        "https://cp.example.org",
        "a..b",
        "-a.example",
        "*.org",
        "é.example",
        "",
    ]:
        with pytest.raises(InvalidArgument, match="neither an IP address nor a DNS name"):
            server_name_sans([bad])
    with pytest.raises(InvalidArgument, match="at least one name"):
        server_name_sans([])


def test_issue_server_chain_and_sans(ca: CertificateAuthority) -> None:
    names = ["cp.example.org", "127.0.0.1", "localhost", "::1"]
    before = datetime.now(UTC).replace(microsecond=0)
    chain_pem, key_pem = ca.issue_server(names, timedelta(days=90))
    chain = x509.load_pem_x509_certificates(chain_pem)
    assert len(chain) == 2
    leaf, second = chain
    assert second == ca.certificate
    assert chain_pem.endswith(ca.certificate_pem)
    leaf.verify_directly_issued_by(ca.certificate)

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["cp.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cp.example.org"
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    after = datetime.now(UTC)
    # Backdated (at least as much as agent certificates), and valid for the lifetime asked.
    assert leaf.not_valid_before_utc <= after - BACKDATE
    assert leaf.not_valid_before_utc >= before - timedelta(hours=1)
    assert before + timedelta(days=90) <= leaf.not_valid_after_utc <= after + timedelta(days=90)

    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == leaf.public_key()
    assert key.public_key() != ca.certificate.public_key()
