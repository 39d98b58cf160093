"""The control plane's data directory: created once by ``init``, opened by
every other command. Private keys are stored sealed under the master key.

    DIR/state.json          layout version, trust domain, server names
    DIR/master.key          0600, unless the operator supplies TESTHIDE_MASTER_KEY
    DIR/ca.pem              the agent CA certificate (public)
    DIR/ca.key.sealed       its private key, AES-256-GCM under the master key
    DIR/server.pem          the listeners' certificate chain (leaf, CA)
    DIR/server.key.sealed   its private key, sealed
    DIR/testhide.db         the SQLite store
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.atrest import MASTER_KEY_ENV, MasterKey
from controlplane.auth.principal import SCOPES
from controlplane.auth.secrets import hash_secret, new_api_key
from controlplane.ca.authority import CertificateAuthority, is_development_ca
from controlplane.errors import ConfigError, DataDirError
from controlplane.store.base import ApiKeyRecord
from controlplane.store.sqlite import SqliteStore

LAYOUT_VERSION = 1
SERVER_CERT_LIFETIME = timedelta(days=90)


@dataclass(frozen=True)
class DataDir:
    path: Path

    @property
    def db_path(self) -> Path:
        return self.path / "testhide.db"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    def require_initialised(self) -> dict[str, object]:
        if not self.path.is_dir():
            raise DataDirError(f"data dir {self.path} does not exist; run 'testhide-controlplane init' first")
        if not self.state_path.is_file():
            raise DataDirError(f"data dir {self.path} is not initialised; run 'testhide-controlplane init' first")
        state: dict[str, object] = json.loads(self.state_path.read_text())
        if state.get("layout_version") != LAYOUT_VERSION:
            raise DataDirError(f"data dir {self.path} has layout {state.get('layout_version')}, "
                               f"expected {LAYOUT_VERSION}")
        return state

    def master_key(self) -> MasterKey:
        return MasterKey.load(self.path / "master.key")

    def _unseal_key(self, name: str, master: MasterKey) -> ec.EllipticCurvePrivateKey:
        pem = master.unseal((self.path / name).read_bytes(), aad=name.encode())
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def load_ca(self, master: MasterKey, allow_development: bool = False) -> CertificateAuthority:
        state = self.require_initialised()
        cert = x509.load_pem_x509_certificate((self.path / "ca.pem").read_bytes())
        if is_development_ca(cert) and not allow_development:
            raise ConfigError("this data dir uses development certificates from certs-dev/; "
                              "start with --dev to accept them, never in production")
        return CertificateAuthority(cert, self._unseal_key("ca.key.sealed", master), str(state["trust_domain"]))

    def server_credentials(self, master: MasterKey) -> tuple[bytes, bytes]:
        """(private key PEM, certificate chain PEM) of the listeners."""
        key = self._unseal_key("server.key.sealed", master)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return key_pem, (self.path / "server.pem").read_bytes()


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


async def initialise(path: Path, server_names: list[str], trust_domain: str = "testhide.local",
                     imported_ca: tuple[bytes, bytes] | None = None) -> str:
    """Create the data dir and return the admin API key (shown once).

    Everything is built in a sibling temporary directory and renamed into
    place, so a refused or failed init leaves nothing behind."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DataDirError(f"{path} already exists and is not empty; refusing to initialise it again")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.init-", dir=path.parent))
    try:
        admin_key = await _populate(staging, server_names, trust_domain, imported_ca)
        if path.exists():
            path.rmdir()
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return admin_key


async def _populate(root: Path, server_names: list[str], trust_domain: str,
                    imported_ca: tuple[bytes, bytes] | None) -> str:
    root.chmod(0o700)
    master = MasterKey.from_env_value(os.environ[MASTER_KEY_ENV]) if os.environ.get(MASTER_KEY_ENV) else None
    if master is None:
        master = MasterKey.generate()
        master.save(root / "master.key")
    if imported_ca:
        cert = x509.load_pem_x509_certificate(imported_ca[0])
        key = serialization.load_pem_private_key(imported_ca[1], password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("the imported CA key must be an ECDSA key")
        ca = CertificateAuthority(cert, key, trust_domain)
    else:
        ca = CertificateAuthority.create(trust_domain)
    _write(root / "ca.pem", ca.certificate_pem)
    _write(root / "ca.key.sealed", master.seal(ca.key_pem(), aad=b"ca.key.sealed"), 0o600)
    chain, server_key = ca.issue_server(server_names, SERVER_CERT_LIFETIME)
    _write(root / "server.pem", chain)
    _write(root / "server.key.sealed", master.seal(server_key, aad=b"server.key.sealed"), 0o600)

    store = await SqliteStore.open(root / "testhide.db")
    try:
        now = datetime.now(UTC)
        await store.create_org("default", now)
        await store.create_pool("default", "default", now)
        admin_key, parsed = new_api_key()
        await store.create_api_key(ApiKeyRecord(parsed.key_id, "default", "admin", hash_secret(parsed.secret),
                                                SCOPES, now))
    finally:
        await store.close()
    state = {"layout_version": LAYOUT_VERSION, "trust_domain": trust_domain, "server_names": server_names,
             "created_at": datetime.now(UTC).isoformat()}
    _write(root / "state.json", json.dumps(state, indent=2).encode() + b"\n")
    return admin_key
