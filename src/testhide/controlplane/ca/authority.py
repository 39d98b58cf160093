"""An ECDSA P-256 certificate authority: agent certificates from CSRs, and
server certificates for the control plane's listeners."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from testhide.common.identity import AGENT_CERT_BACKDATE, AgentIdentity
from testhide.controlplane.errors import InvalidArgument

# The TLS handshake has no skew tolerance; a notBefore even slightly ahead of a
# peer's clock is refused, so every certificate is backdated.
BACKDATE = AGENT_CERT_BACKDATE
# CA and server certificates live for months or years, so they can afford a
# longer margin: an agent whose clock is minutes behind still accepts one
# issued just now.
SERVER_BACKDATE = timedelta(minutes=5)
DEV_MARKER = "testhide development (insecure)"
_DNS_LABEL = re.compile(r"\A(?!-)[a-z0-9-]{1,63}(?<!-)\Z", re.IGNORECASE)


def server_name_sans(names: Sequence[str]) -> list[x509.GeneralName]:
    """The server certificate's subject alternative names: every name the
    operator gives, an IP address as an IP SAN (clients check an address
    against those only), anything else as a DNS name."""
    if not names:
        raise InvalidArgument("a server certificate needs at least one name")
    sans: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))))
            continue
        except ValueError:
            pass
        labels = name.split(".")
        if labels[0] == "*" and len(labels) > 2:
            labels = labels[1:]  # a wildcard only as the whole first label
        if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
            raise InvalidArgument(
                f"server name {name!r} is neither an IP address nor a DNS name (give no port or scheme)"
            )
        sans.append(x509.DNSName(name))
    return sans


@dataclass(frozen=True)
class IssuedCertificate:
    certificate_pem: bytes
    serial: int
    not_after: datetime


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def is_development_ca(cert: x509.Certificate) -> bool:
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return any(DEV_MARKER in str(attr.value) for attr in orgs)


def agent_public_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The P-256 key of an agent's CSR, or ``InvalidArgument`` saying what is wrong with it."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidArgument("csr_pem is not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise InvalidArgument("the CSR's signature does not match its public key")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise InvalidArgument("agent keys must be ECDSA P-256")
    return public_key


class CertificateAuthority:
    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey, trust_domain: str):
        self.certificate = certificate
        self._key = key
        self.trust_domain = trust_domain

    @classmethod
    def create(
        cls, trust_domain: str, generation: int = 1, lifetime: timedelta = timedelta(days=3650)
    ) -> CertificateAuthority:
        """Each generation has its own name, so certificates say which one issued them."""
        key = generate_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "testhide"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"testhide agent CA {generation} ({trust_domain})"),
            ]
        )
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SERVER_BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, trust_domain)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return key_to_pem(self._key)

    def _leaf(
        self,
        subject_cn: str,
        public_key: ec.EllipticCurvePublicKey,
        lifetime: timedelta,
        now: datetime,
        backdate: timedelta = BACKDATE,
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - backdate)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )

    def issue_agent(
        self, csr_pem: bytes, identity: AgentIdentity, lifetime: timedelta, now: datetime | None = None
    ) -> IssuedCertificate:
        """Sign a CSR. Only its public key is used: the identity is ours to decide."""
        public_key = agent_public_key(csr_pem)
        now = now or datetime.now(UTC)
        cert = (
            self._leaf(f"agent {identity.agent_id}", public_key, lifetime, now)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=False
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(
            cert.public_bytes(serialization.Encoding.PEM), cert.serial_number, cert.not_valid_after_utc
        )

    def issue_statement_signer(
        self, public_key: ec.EllipticCurvePublicKey, lifetime: timedelta, now: datetime
    ) -> x509.Certificate:
        """For the control plane's statement-signing key (``ca/statement_keys.py``): code
        signing only, so neither an agent's nor a server's certificate can pass for one."""
        return (
            self._leaf("testhide statement signer", public_key, lifetime, now, SERVER_BACKDATE)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def issue_server(self, names: list[str], lifetime: timedelta) -> tuple[bytes, bytes]:
        """A server certificate (PEM chain: leaf then CA) and its key (PEM)."""
        sans = server_name_sans(names)
        key = generate_key()
        cert = (
            self._leaf(names[0], key.public_key(), lifetime, datetime.now(UTC), SERVER_BACKDATE)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        # The CA travels in the chain so that an enrolling agent can find the
        # certificate its token pins.
        return cert.public_bytes(serialization.Encoding.PEM) + self.certificate_pem, key_to_pem(key)
