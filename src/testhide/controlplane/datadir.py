"""The control plane's data directory: created once by ``init``, opened by
every other command. Private keys are stored sealed under the master key.

    DIR/state.json            layout version, trust domain, server names, CA generations
    DIR/master.key            0600 key ring (current key first), unless TESTHIDE_MASTER_KEY supplies it
    DIR/keyring.pkcs11        0600 instead of master.key: the ring wrapped by a key in an HSM (hsm.py)
    DIR/ca.pem                the trust bundle: every trusted CA (public; give it to clients)
    DIR/cas/ca-N.pem          CA generation N
    DIR/cas/ca-N.key.sealed   its private key, AES-256-GCM under the master key
    DIR/server.pem            the listeners' certificate chain (leaf, issuing CA)
    DIR/server.key.sealed     its private key, sealed
    DIR/audit.key.sealed      the audit chain's MAC key, sealed
    DIR/signing/*.key.sealed  access-token signing keys, sealed
    DIR/testhide.db           the SQLite store (the default), or
    DIR/database.url          0600: the PostgreSQL store's URL (TESTHIDE_DATABASE_URL overrides it)
    DIR/backups/              0700 backups written by serve (schedule, before a migration) and migrate
    DIR/run/                  which key ids each running ``serve`` holds (for master-key rotation)
    DIR/.sealing.lock         taken by whoever writes or copies sealed files
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from testhide.common.files import atomic_write, file_lock
from testhide.common.tls import fingerprint
from testhide.controlplane import hsm
from testhide.controlplane.atrest import MASTER_KEY_ENV, MasterKey, PlainRingFile
from testhide.controlplane.auth.audit import AuditChain, legacy_audit_key
from testhide.controlplane.auth.principal import SCOPES
from testhide.controlplane.auth.secrets import hash_secret, new_api_key
from testhide.controlplane.ca.authority import CertificateAuthority, is_development_ca
from testhide.controlplane.errors import ConfigError, DataDirError
from testhide.controlplane.store.base import DEFAULT_ADMIN_KEY_MAX_LIFETIME, ApiKeyRecord, Store
from testhide.controlplane.store.sqlite import SqliteStore

T = TypeVar("T")
LAYOUT_VERSION = 1
AUDIT_KEY = "audit.key.sealed"
SERVER_CERT_LIFETIME = timedelta(days=90)
DATABASE_URL_ENV = "TESTHIDE_DATABASE_URL"
DATABASE_URL_FILE = "database.url"


BACKUPS_DIR = "backups"
"""DIR/backups: never inside a backup, never shared between replicas."""


@dataclass(frozen=True)
class TlsMaterial:
    """What the listeners serve, as one consistent snapshot."""

    active_ca: CertificateAuthority
    trusted: tuple[x509.Certificate, ...]
    server_key_pem: bytes
    server_chain_pem: bytes

    @property
    def bundle_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.trusted)

    @cached_property
    def trusted_fingerprints(self) -> tuple[str, ...]:
        """Of ``trusted``, in its order; computed once (the agent port reads it per call)."""
        return tuple(fingerprint(c.public_bytes(serialization.Encoding.DER)) for c in self.trusted)

    @property
    def server_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.server_chain_pem)


@dataclass(frozen=True)
class DataDir:
    path: Path
    master_key_option: str | None = None
    """``--master-key``: ``file:PATH`` or a ``pkcs11:`` URI; None: what the data dir has."""

    @property
    def db_path(self) -> Path:
        return self.path / "testhide.db"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def uses_postgres(self) -> bool:
        return bool(self.require_initialised().get("store") == "postgresql")

    def database_url(self) -> str:
        """The PostgreSQL store's URL: TESTHIDE_DATABASE_URL, else DIR/database.url."""
        url = os.environ.get(DATABASE_URL_ENV, "").strip()
        if url:
            return url
        try:
            return (self.path / DATABASE_URL_FILE).read_text().strip()
        except FileNotFoundError:
            raise DataDirError(
                f"data dir {self.path} uses PostgreSQL but has no {DATABASE_URL_FILE};"
                f" set {DATABASE_URL_ENV} or write the URL there (mode 0600)"
            ) from None

    async def open_store(
        self,
        busy_timeout: timedelta = timedelta(seconds=10),
        migrate: bool = False,
        require_current: bool = True,
    ) -> Store:
        """The data dir's store: SQLite in DIR/testhide.db (never created here: a
        missing, empty or damaged file is refused), or the PostgreSQL database
        ``init --database`` recorded. ``migrate``: bring the schema up to date
        (nothing but ``serve`` and ``migrate`` do, after a backup); otherwise a
        schema that is not current is refused, unless ``require_current`` is
        false. A schema newer than this program's is always refused."""
        if self.uses_postgres:
            from testhide.controlplane.store.postgres import PgStore

            return await PgStore.open(self.database_url(), migrate=migrate, require_current=require_current)
        return await SqliteStore.open(
            self.db_path, busy_timeout, migrate=migrate, create=False, require_current=require_current
        )

    def require_initialised(self) -> dict[str, Any]:
        if not self.path.is_dir():
            _refuse_pseudo_filesystem(self.path)  # init would not help
            raise DataDirError(f"data dir {self.path} does not exist; run 'testhide-controlplane init' first")
        if not self.state_path.is_file():
            _refuse_pseudo_filesystem(self.path)
            raise DataDirError(
                f"data dir {self.path} is not initialised; run 'testhide-controlplane init' first"
            )
        state: dict[str, Any] = json.loads(self.state_path.read_text())
        if state.get("layout_version") != LAYOUT_VERSION:
            raise DataDirError(
                f"data dir {self.path} has layout {state.get('layout_version')}, expected {LAYOUT_VERSION}"
            )
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write(self.state_path, json.dumps(state, indent=2).encode() + b"\n")

    @property
    def master_key_path(self) -> Path:
        return self.path / "master.key"

    @property
    def backups_path(self) -> Path:
        return self.path / BACKUPS_DIR

    @property
    def keyring_path(self) -> Path:
        return self.path / hsm.KEYRING_FILE

    def master_key(self) -> MasterKey:
        """The key ring, from (first that applies) ``--master-key``, the HSM-wrapped
        DIR/keyring.pkcs11, TESTHIDE_MASTER_KEY, DIR/master.key. Every command opens it here."""
        choice = hsm.master_key_choice(self.master_key_option)
        if isinstance(choice, Path):
            return MasterKey.from_ring_file(PlainRingFile(choice))
        if choice is None and not self.keyring_path.exists():
            return MasterKey.load(self.master_key_path)
        if choice is None and os.environ.get(MASTER_KEY_ENV):
            raise ConfigError(
                f"data dir {self.path} keeps its master key ring in an HSM ({hsm.KEYRING_FILE}), yet"
                f" {MASTER_KEY_ENV} is set too: unset it"
            )
        if not self.keyring_path.exists() and self.master_key_path.exists():
            raise ConfigError(
                f"data dir {self.path} keeps its master key in {self.master_key_path.name}, not in an HSM"
                f" (it has no {hsm.KEYRING_FILE}): leave out --master-key"
            )
        return MasterKey.from_ring_file(hsm.Pkcs11RingFile(self.keyring_path, choice))

    @contextmanager
    def sealing(self) -> Iterator[None]:
        """Held while sealed files are written, re-sealed or copied, so a
        rotation or a backup never sees half of a multi-file change."""
        with file_lock(self.path / ".sealing.lock"):
            yield

    def sealed_files(self) -> list[str]:
        """Every file sealed under the master key, named as its associated data."""
        return sorted(
            p.relative_to(self.path).as_posix()
            for p in self.path.rglob("*.sealed")
            if p.is_file() and not p.name.startswith(".")
        )

    def create_audit_key(self, master: MasterKey, key: bytes | None = None) -> None:
        with self.sealing():
            if not (self.path / AUDIT_KEY).exists():  # another process may have won
                atomic_write(
                    self.path / AUDIT_KEY, master.seal(key or os.urandom(32), AUDIT_KEY.encode()), 0o600
                )

    async def audit_key(self, master: MasterKey, store: Store) -> bytes:
        """The audit chain's key; data dirs from before it was stored on its
        own get the key their chain was made with (derived from the master key)."""
        path = self.path / AUDIT_KEY
        if not path.exists():
            self.create_audit_key(master, await _legacy_audit_key(master, store))
        return master.unseal(path.read_bytes(), AUDIT_KEY.encode())

    def _unseal_key(self, name: str, master: MasterKey) -> ec.EllipticCurvePrivateKey:
        pem = master.unseal((self.path / name).read_bytes(), aad=name.encode())
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def ca_certificate(self, generation: int) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.path / "cas" / f"ca-{generation}.pem").read_bytes())

    def load_ca(
        self, master: MasterKey, generation: int | None = None, allow_development: bool = False
    ) -> CertificateAuthority:
        state = self.require_initialised()
        generation = generation or int(state["ca"]["active"])
        cert = self.ca_certificate(generation)
        if is_development_ca(cert) and not allow_development:
            raise ConfigError(
                "this data dir uses development certificates from certs-dev/; "
                "start with --dev to accept them, never in production"
            )
        key = self._unseal_key(f"cas/ca-{generation}.key.sealed", master)
        return CertificateAuthority(cert, key, str(state["trust_domain"]))

    def store_ca(self, ca: CertificateAuthority, generation: int, master: MasterKey) -> None:
        (self.path / "cas").mkdir(mode=0o700, exist_ok=True)
        name = f"cas/ca-{generation}.key.sealed"
        with self.sealing():
            atomic_write(self.path / name, master.seal(ca.key_pem(), aad=name.encode()), 0o600)
            atomic_write(self.path / "cas" / f"ca-{generation}.pem", ca.certificate_pem)

    def write_bundle(self, generations: list[int]) -> None:
        bundle = b"".join(
            self.ca_certificate(g).public_bytes(serialization.Encoding.PEM) for g in generations
        )
        atomic_write(self.path / "ca.pem", bundle)

    def issue_server_certificate(
        self,
        ca: CertificateAuthority,
        names: list[str],
        master: MasterKey,
        lifetime: timedelta = SERVER_CERT_LIFETIME,
    ) -> x509.Certificate:
        chain, key = ca.issue_server(names, lifetime)
        # Key first: a reader that sees the new chain must find the matching key.
        with self.sealing():
            atomic_write(
                self.path / "server.key.sealed.next", master.seal(key, aad=b"server.key.sealed"), 0o600
            )
            atomic_write(self.path / "server.pem.next", chain)
            os.replace(self.path / "server.key.sealed.next", self.path / "server.key.sealed")
            os.replace(self.path / "server.pem.next", self.path / "server.pem")
        return x509.load_pem_x509_certificate(chain)

    def tls_material(self, master: MasterKey, allow_development: bool = False) -> TlsMaterial:
        state = self.require_initialised()
        for _ in range(3):  # a rotation may replace the pair between our two reads
            chain = (self.path / "server.pem").read_bytes()
            key = self._unseal_key("server.key.sealed", master)
            leaf = x509.load_pem_x509_certificate(chain)
            if leaf.public_key() == key.public_key():
                break
        else:
            raise DataDirError("server.pem and server.key.sealed do not match")
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        trusted = tuple(self.ca_certificate(int(g)) for g in state["ca"]["trusted"])
        return TlsMaterial(self.load_ca(master, allow_development=allow_development), trusted, key_pem, chain)

    def fingerprint_of_files(self) -> tuple[int, ...]:
        """Changes whenever a rotation rewrote what the listeners serve."""
        return tuple(os.stat(self.path / name).st_mtime_ns for name in ("state.json", "server.pem", "ca.pem"))


async def _empty_postgres_store(url: str) -> Store:
    """The PostgreSQL store, migrated, refused if it already holds an install
    (a replica gets a copy of the data dir instead)."""
    from testhide.controlplane.store.postgres import PgStore

    store = await PgStore.open(url)
    try:
        if await store.list_orgs():
            raise DataDirError(
                "that database already holds a testhide control plane; to add a replica, copy its data dir"
                " (with master.key and database.url) instead of running init again"
            )
    except BaseException:
        await store.close()
        raise
    return store


async def _legacy_audit_key(master: MasterKey, store: Store) -> bytes | None:
    """The ring key whose derived audit key MACs the stored head; None for an
    empty log (a fresh random key will do)."""
    _, head = await store.read_audit()
    if head is None:
        return None
    seq, head_hash, mac = head
    candidates = [legacy_audit_key(material) for material in master.legacy_material()]
    for candidate in candidates:
        if hmac.compare_digest(AuditChain(candidate).head_mac(seq, head_hash), mac):
            return candidate
    return candidates[-1]  # none fits: the head was altered, and verify will say so


async def initialise(
    path: Path,
    server_names: list[str],
    trust_domain: str = "testhide.local",
    imported_ca: tuple[bytes, bytes] | None = None,
    database_url: str | None = None,
    master_key: str | None = None,
) -> str:
    """Create the data dir and return the admin API key (shown once).
    ``database_url``: keep the store in that (empty) PostgreSQL database
    instead of DIR/testhide.db; the data dir records the URL. ``master_key``:
    a ``pkcs11:`` URI, to keep the master key ring wrapped by that HSM key."""
    uri = _init_master_key_uri(master_key)
    return await build_atomically(
        path,
        "init",
        "refusing to initialise it again",
        lambda staging: _populate(staging, server_names, trust_domain, imported_ca, database_url, uri),
    )


def _init_master_key_uri(option: str | None) -> hsm.Pkcs11Uri | None:
    choice = hsm.master_key_choice(option)
    if isinstance(choice, Path):
        raise ConfigError(
            f"init makes its own master key (DIR/master.key, or {MASTER_KEY_ENV}); --master-key takes a"
            " pkcs11: URI here"
        )
    if choice is not None and os.environ.get(MASTER_KEY_ENV):
        raise ConfigError(f"give the master key by --master-key pkcs11:... or by {MASTER_KEY_ENV}, not both")
    return choice


async def build_atomically(
    path: Path, purpose: str, refusal: str, build: Callable[[DataDir], Awaitable[T]]
) -> T:
    """Build a data dir in a sibling temporary directory and rename it into
    ``path`` (absent or empty) once ``build`` succeeded: a refused or failed
    init or restore leaves nothing behind."""
    staging = await asyncio.to_thread(_new_staging, path, purpose, refusal)
    try:
        result = await build(DataDir(staging))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    await asyncio.to_thread(_move_into_place, staging, path)
    return result


def _new_staging(path: Path, purpose: str, refusal: str) -> Path:
    _refuse_pseudo_filesystem(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DataDirError(f"{path} already exists and is not empty; {refusal}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.{purpose}-", dir=path.parent))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise DataDirError(
            f"cannot create the data dir {path} ({where}{exc.strerror or exc}); choose a directory"
            " on a local disk that this user can create, with --data-dir"
        ) from exc


# Kernel pseudo-filesystems: they show the system's state and cannot hold a private directory.
PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"))


def _refuse_pseudo_filesystem(path: Path) -> None:
    try:
        resolved = path.resolve()  # /proc/self/... is a link to /proc/PID/...
    except (OSError, RuntimeError):  # a loop of links: the absolute path still says where
        resolved = path.absolute()
    for root in PSEUDO_FILESYSTEMS:
        if resolved.is_relative_to(root) or path.absolute().is_relative_to(root):
            raise DataDirError(
                f"data dir {path} is under {root}, a kernel pseudo-filesystem that cannot hold a private"
                " directory; choose a directory on a local disk (such as /var/lib/testhide) with --data-dir"
            )


def _move_into_place(staging: Path, path: Path) -> None:
    try:
        if path.exists():
            path.rmdir()
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


async def _populate(
    directory: DataDir,
    server_names: list[str],
    trust_domain: str,
    imported_ca: tuple[bytes, bytes] | None,
    database_url: str | None,
    uri: hsm.Pkcs11Uri | None = None,
) -> str:
    root = directory.path
    root.chmod(0o700)
    master = MasterKey.from_env_value(os.environ[MASTER_KEY_ENV]) if os.environ.get(MASTER_KEY_ENV) else None
    if uri is not None:
        master = await asyncio.to_thread(hsm.create_ring, directory.keyring_path, uri)
    elif master is None:
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
    directory.store_ca(ca, 1, master)
    directory.create_audit_key(master)
    directory.write_bundle([1])
    directory.issue_server_certificate(ca, server_names, master)

    store: Store
    if database_url:
        store = await _empty_postgres_store(database_url)
        atomic_write(root / DATABASE_URL_FILE, database_url.encode() + b"\n", 0o600)
    else:
        store = await SqliteStore.open(directory.db_path, create=True)  # the only place one is made
    try:
        now = datetime.now(UTC)
        await store.create_org("default", now)
        await store.create_pool("default", "default", now)
        admin_key, parsed = new_api_key()
        # It holds the admin scopes, so it lives no longer than a new organisation's policy allows.
        await store.create_api_key(
            ApiKeyRecord(
                parsed.key_id,
                "default",
                "admin",
                hash_secret(parsed.secret),
                SCOPES,
                now,
                expires_at=now + DEFAULT_ADMIN_KEY_MAX_LIFETIME,
            )
        )
    finally:
        await store.close()
    directory.write_state(
        {
            "layout_version": LAYOUT_VERSION,
            "trust_domain": trust_domain,
            "server_names": server_names,
            "created_at": datetime.now(UTC).isoformat(),
            "ca": {"active": 1, "trusted": [1]},
            "store": "postgresql" if database_url else "sqlite",
        }
    )
    from testhide.controlplane.auth.tokens import rotate_signing_key

    rotate_signing_key(directory, master)
    if database_url:
        # Copies of this data dir (replicas on other machines) follow its files through the database.
        from testhide.controlplane.shared import SharedFiles
        from testhide.controlplane.store.postgres import PgStore

        shared_store = await PgStore.open(database_url, pool_size=1)
        try:
            await SharedFiles(directory, master, shared_store).publish()
        finally:
            await shared_store.close()
    return admin_key
