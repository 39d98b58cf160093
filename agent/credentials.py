"""The agent's identity on disk: its private key (0600, never leaves the
host), its current certificate, the CA bundle and where to connect."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ConfigError


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_key_and_csr() -> tuple[bytes, bytes]:
    """A fresh P-256 key (PEM) and a CSR (PEM) proving possession of it."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Credentials:
    agent_id: str
    api_endpoint: str
    agent_endpoint: str
    key_pem: bytes
    certificate_pem: bytes
    ca_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)

    @property
    def expired(self) -> bool:
        return self.certificate.not_valid_after_utc <= datetime.now(UTC)

    def save(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(directory / "agent.key", self.key_pem, 0o600)
        atomic_write(directory / "agent.pem", self.certificate_pem, 0o644)
        atomic_write(directory / "ca.pem", self.ca_pem, 0o644)
        meta = {"agent_id": self.agent_id, "api_endpoint": self.api_endpoint, "agent_endpoint": self.agent_endpoint}
        atomic_write(directory / "agent.json", json.dumps(meta, indent=2).encode() + b"\n", 0o644)

    @classmethod
    def load(cls, directory: Path) -> Credentials:
        try:
            meta = json.loads((directory / "agent.json").read_text())
            key_path = directory / "agent.key"
            if key_path.stat().st_mode & 0o077:
                raise ConfigError(f"{key_path} must not be readable by group or others (chmod 600)")
            return cls(meta["agent_id"], meta["api_endpoint"], meta["agent_endpoint"], key_path.read_bytes(),
                       (directory / "agent.pem").read_bytes(), (directory / "ca.pem").read_bytes())
        except FileNotFoundError as exc:
            raise ConfigError(f"{directory} holds no enrolled agent; run 'testhide-agent enroll' first") from exc
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{directory}/agent.json is damaged: {exc}") from exc
