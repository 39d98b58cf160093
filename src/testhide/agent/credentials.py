"""The agent's identity on disk: its private key (0600, never leaves the
host), its current certificate, the CA bundle and where to connect: the API
endpoint of every control-plane replica it was enrolled with, and the agent
endpoint of each (see `agent/endpoints.py`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from testhide.agent.errors import ConfigError
from testhide.common.files import atomic_write
from testhide.common.identity import AGENT_CERT_BACKDATE


def new_key_and_csr() -> tuple[bytes, bytes]:
    """A fresh P-256 key (PEM) and a CSR (PEM) proving possession of it."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Credentials:
    agent_id: str
    api_endpoints: tuple[str, ...]
    """HOST:PORT of each replica's API port, in the operator's order."""
    agent_endpoints: tuple[str, ...]
    """HOST:PORT of each replica's agent port (mutual TLS); the stream goes to one of them."""
    key_pem: bytes
    certificate_pem: bytes
    ca_pem: bytes
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    """When this certificate arrived, by this host's clock."""

    def __post_init__(self) -> None:
        if not self.api_endpoints or not self.agent_endpoints:
            raise ConfigError("the agent's credentials name no control plane endpoint")

    @property
    def lifetime(self) -> timedelta:
        """The lifetime the control plane meant. Measured on the certificate
        alone (both ends are the server's clock), so this host's clock skew
        does not enter; only durations are added to our own clock."""
        cert = self.certificate
        return cert.not_valid_after_utc - cert.not_valid_before_utc - AGENT_CERT_BACKDATE

    @property
    def expires_at(self) -> datetime:
        """Expiry by this host's clock."""
        return self.received_at + self.lifetime

    def renewal_at(self, jitter: float) -> datetime:
        """Half-way through the lifetime, shifted by ``jitter`` (in [-0.1, 0.1]) of it."""
        return self.received_at + self.lifetime * (0.5 + jitter)

    def with_certificate(
        self, key_pem: bytes, certificate_pem: bytes, ca_pem: bytes | None = None
    ) -> Credentials:
        return replace(
            self,
            key_pem=key_pem,
            certificate_pem=certificate_pem,
            ca_pem=ca_pem or self.ca_pem,
            received_at=datetime.now(UTC),
        )

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)

    @property
    def expired(self) -> bool:
        return self.expires_at <= datetime.now(UTC)

    def save(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(directory / "agent.key", self.key_pem, 0o600)
        atomic_write(directory / "agent.pem", self.certificate_pem, 0o644)
        atomic_write(directory / "ca.pem", self.ca_pem, 0o644)
        meta = {
            "agent_id": self.agent_id,
            "api_endpoints": list(self.api_endpoints),
            "agent_endpoints": list(self.agent_endpoints),
            # The first of each under the names of one endpoint, which agents before
            # replicas read: such an agent can still run on these credentials.
            "api_endpoint": self.api_endpoints[0],
            "agent_endpoint": self.agent_endpoints[0],
            "certificate_received_at": self.received_at.isoformat(),
        }
        atomic_write(directory / "agent.json", json.dumps(meta, indent=2).encode() + b"\n", 0o644)

    @classmethod
    def load(cls, directory: Path) -> Credentials:
        try:
            meta = json.loads((directory / "agent.json").read_text())
            key_path = directory / "agent.key"
            if key_path.stat().st_mode & 0o077:
                raise ConfigError(f"{key_path} must not be readable by group or others (chmod 600)")
            received = meta.get("certificate_received_at")
            return cls(
                meta["agent_id"],
                _endpoints(meta, "api_endpoint"),
                _endpoints(meta, "agent_endpoint"),
                key_path.read_bytes(),
                (directory / "agent.pem").read_bytes(),
                (directory / "ca.pem").read_bytes(),
                datetime.fromisoformat(received) if received else datetime.now(UTC),
            )
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{directory} holds no enrolled agent; run 'testhide-agent enroll' first"
            ) from exc
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{directory}/agent.json is damaged: {exc}") from exc


def _endpoints(meta: dict[str, object], name: str) -> tuple[str, ...]:
    """The list ``NAMEs``, or, in credentials written before replicas, the one ``NAME``."""
    found = meta[f"{name}s"] if f"{name}s" in meta else [meta[name]]
    if not isinstance(found, list) or not found or not all(isinstance(e, str) and e for e in found):
        raise ValueError(f"{name}s must be a list of HOST:PORT")
    return tuple(found)
