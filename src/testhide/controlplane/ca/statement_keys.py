"""The control plane's statement-signing keys: ECDSA P-256 keys that countersign jobs'
statements (common/statement.py). Never the CA key: a key that signs on every job result is
exposed far more than one that signs a certificate an hour, so it is its own, rotatable key.

Each key's certificate is issued by the control plane's CA, so a verifier who trusts the CA
file trusts the key without trusting the server. The certificate lasts the key's active period
plus a retirement window: the key countersigns until ``active_until`` (then a new key takes
over, on its own at the next countersignature or by ``statement-keys rotate``), and its
certificate expires a window later, so a countersignature it makes after that window fails
verification. Old keys stay in the store (their certificates are published with every job's
evidence), so what they countersigned still verifies.

At rest the private key is sealed (AES-GCM) under the key's own data key, itself wrapped by the
master key: master-key rotation re-wraps it like every other data key (``statement_keys`` is
one of ``DATA_KEY_TABLES``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from testhide.common.statement import key_id, rfc3339, sign
from testhide.controlplane.atrest import MasterKey, seal, unseal
from testhide.controlplane.ca.authority import CertificateAuthority, generate_key
from testhide.controlplane.ca.statement_store import StatementKeyRecord, StatementStore

log = structlog.get_logger("testhide.statement_keys")

DEFAULT_ACTIVE = timedelta(days=30)
"""How long a key countersigns before a new one takes over."""
DEFAULT_RETIREMENT_WINDOW = timedelta(days=7)
"""How long a key's certificate outlasts its active period."""
RELOAD_S = 60.0
"""How often a running control plane looks for a key another process made (a rotation)."""


def _aad(kid: str) -> bytes:
    return f"statement-key:{kid}".encode()


def new_statement_key(
    ca: CertificateAuthority,
    master: MasterKey,
    now: datetime,
    active: timedelta = DEFAULT_ACTIVE,
    retirement_window: timedelta = DEFAULT_RETIREMENT_WINDOW,
) -> StatementKeyRecord:
    key = generate_key()
    cert_der = ca.issue_statement_signer(key.public_key(), active + retirement_window, now).public_bytes(
        serialization.Encoding.DER
    )
    kid = key_id(cert_der)
    data_key, wrapped = master.new_data_key(aad=kid.encode())
    private = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return StatementKeyRecord(kid, wrapped, seal(data_key, private, _aad(kid)), cert_der, now, now + active)


@dataclass(frozen=True)
class SigningKey:
    """An unsealed statement-signing key, in memory only."""

    id: str
    private_key: ec.EllipticCurvePrivateKey
    active_until: datetime

    def countersign(self, payload: bytes) -> bytes:
        return sign(self.private_key, payload)


def unseal_key(record: StatementKeyRecord, master: MasterKey) -> SigningKey:
    data_key = master.unwrap_data_key(record.data_key, aad=record.id.encode())
    key = serialization.load_der_private_key(unseal(data_key, record.private_key, _aad(record.id)), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"statement key {record.id} is not an ECDSA key")
    return SigningKey(record.id, key, record.active_until)


def usable(record: StatementKeyRecord, now: datetime) -> bool:
    return record.retired_at is None and now < record.active_until


async def rotate(
    store: StatementStore,
    ca: CertificateAuthority,
    master: MasterKey,
    now: datetime,
    active: timedelta = DEFAULT_ACTIVE,
    retirement_window: timedelta = DEFAULT_RETIREMENT_WINDOW,
) -> tuple[StatementKeyRecord, list[str]]:
    """A new key countersigns from now on; the keys that did are retired (their certificates
    stay published). The new record, and the ids retired."""
    record = new_statement_key(ca, master, now, active, retirement_window)
    await store.add_statement_key(record)
    retired = [k.id for k in await store.statement_keys() if k.id != record.id and k.retired_at is None]
    for kid in retired:
        await store.retire_statement_key(kid, now)
    log.info("statement_key_rotated", key_id=record.id, retired=retired)
    return record, retired


class StatementKeys:
    """What a running control plane countersigns with, and the certificates it publishes."""

    def __init__(
        self,
        store: StatementStore,
        master: MasterKey,
        ca: Callable[[], CertificateAuthority],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._master = master
        self._ca = ca
        self._clock = clock
        self._records: list[StatementKeyRecord] = []
        self._current: SigningKey | None = None
        self._loaded_at = -RELOAD_S
        self._reloading = asyncio.Lock()

    async def _reload(self) -> None:
        """The keys as stored, and the one to countersign with: a new one added when none is
        usable (none yet, or the last one's time is up). Adding retires nothing: two replicas
        that add one each at once both keep countersigning, each with a valid key."""
        async with self._reloading:  # the many results of one batch wait for one reload
            if self._fresh():
                return
            self._records = await self._store.statement_keys()
            now = self._clock()
            found = [r for r in self._records if usable(r, now)]
            if not found:
                record = new_statement_key(self._ca(), self._master, now)
                await self._store.add_statement_key(record)
                log.info("statement_key_added", key_id=record.id, reason="no usable key")
                self._records = await self._store.statement_keys()
                found = [r for r in self._records if usable(r, now)] or [record]
            self._loaded_at = time.monotonic()
            latest = found[-1]
            if self._current is None or self._current.id != latest.id:
                self._current = unseal_key(latest, self._master)

    def _fresh(self) -> bool:
        """Loaded within ``RELOAD_S``, with a key that still countersigns."""
        return (
            time.monotonic() - self._loaded_at < RELOAD_S
            and self._current is not None
            and self._clock() < self._current.active_until
        )

    async def current(self) -> SigningKey:
        """The key that countersigns now (made if there is none, or the last one's time is up)."""
        if not self._fresh():
            await self._reload()
        assert self._current is not None
        return self._current

    async def certificates(self) -> list[bytes]:
        """Every key's certificate (DER), current and old."""
        if time.monotonic() - self._loaded_at >= RELOAD_S:
            await self._reload()
        return [r.certificate for r in self._records]


def describe(record: StatementKeyRecord, now: datetime) -> dict[str, object]:
    cert = x509.load_der_x509_certificate(record.certificate)
    state = "retired" if record.retired_at else ("active" if now < record.active_until else "expired")
    return {
        "id": record.id,
        "state": state,
        "created_at": rfc3339(record.created_at),
        "stops_signing_at": rfc3339(record.active_until),
        "retired_at": rfc3339(record.retired_at) if record.retired_at else None,
        "certificate_expires_at": rfc3339(cert.not_valid_after_utc),
    }
