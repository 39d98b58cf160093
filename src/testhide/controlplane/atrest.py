"""Encryption at rest: AES-256-GCM under per-object data keys, themselves
wrapped (AES-GCM) by the master key. Nothing here invents cryptography; it only
decides nonces, associated data and layout.

Content sealed under a data key:
    ``b"TH1" || nonce (12 bytes) || ciphertext+tag``
Sealed under the master key (data keys, private keys in files):
    ``b"TH2" || key id (4 bytes) || nonce (12 bytes) || ciphertext+tag``
with the magic and key id bound in as associated data. The key id names the
key of the ring that sealed it, so a rotation can tell what is left to re-wrap.
Objects sealed by the master key before key rings existed are ``TH1``: any
key of the ring may open them (the original key is kept until they are gone).

The master key is a key ring: the current key seals, every key opens what it
sealed. It is a file of base64 keys, one a line, current first (or the same,
comma-separated, in ``TESTHIDE_MASTER_KEY``), or a file that holds the ring
wrapped by a key inside a hardware security module (``hsm``): a ``RingFile``
says how its file is read and written.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from testhide.common.files import atomic_write
from testhide.controlplane.errors import ConfigError, IntegrityError

MASTER_KEY_ENV = "TESTHIDE_MASTER_KEY"
_MAGIC = b"TH1"
_RING_MAGIC = b"TH2"
_KEY_ID = 4
_NONCE = 12
_TAG = 16
LEGACY_KEY_ID = "legacy"


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return _MAGIC + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    if not sealed.startswith(_MAGIC) or len(sealed) < len(_MAGIC) + _NONCE + _TAG:
        raise IntegrityError("stored ciphertext is malformed")
    nonce = sealed[len(_MAGIC) : len(_MAGIC) + _NONCE]
    try:
        return AESGCM(key).decrypt(nonce, sealed[len(_MAGIC) + _NONCE :], aad)
    except InvalidTag as exc:
        raise IntegrityError("stored ciphertext failed authentication (tampered, or another key)") from exc


def key_id(key: bytes) -> str:
    """A short public name for a master key: an HMAC of a constant under it,
    so it says nothing about the key yet tells keys apart."""
    return hmac.new(key, b"testhide master key id v1", hashlib.sha256).digest()[:_KEY_ID].hex()


def sealed_by(sealed: bytes) -> str:
    """The id of the master key that sealed ``sealed``; LEGACY_KEY_ID for the
    format from before key rings (sealed by the original key)."""
    if sealed.startswith(_RING_MAGIC) and len(sealed) >= len(_RING_MAGIC) + _KEY_ID:
        return sealed[len(_RING_MAGIC) : len(_RING_MAGIC) + _KEY_ID].hex()
    if sealed.startswith(_MAGIC):
        return LEGACY_KEY_ID
    raise IntegrityError("stored ciphertext is malformed")


def _decode_ring(text: str, origin: str) -> list[bytes]:
    keys = []
    for item in text.replace(",", "\n").split():
        try:
            keys.append(base64.b64decode(item, validate=True))
        except ValueError as exc:
            raise ConfigError(f"{origin} must hold 32-byte keys, base64-encoded") from exc
    if not keys:
        raise ConfigError(f"{origin} holds no key")
    return keys


class RingFile(Protocol):
    """Where a key ring is kept, and how it is read and written."""

    @property
    def path(self) -> Path: ...

    @property
    def kind(self) -> str:
        """``file`` (the keys themselves) or ``pkcs11`` (wrapped by a key in an HSM)."""
        ...

    def describe(self) -> str: ...

    def read(self) -> tuple[bytes, ...]: ...

    def write(self, keys: Sequence[bytes]) -> None: ...


class PlainRingFile:
    """The ring as base64 lines in a 0600 file (``DIR/master.key``)."""

    kind = "file"

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> str:
        return str(self.path)

    def read(self) -> tuple[bytes, ...]:
        return tuple(_decode_ring(read_key_file(self.path), str(self.path)))

    def write(self, keys: Sequence[bytes]) -> None:
        atomic_write(self.path, "".join(base64.b64encode(k).decode() + "\n" for k in keys).encode(), 0o600)


class MasterKey:
    """The key ring that wraps every data key. Read from a 0600 file in the
    data dir, from a file wrapped by an HSM or, when the operator keeps it
    elsewhere, from ``TESTHIDE_MASTER_KEY``. A ring read from a file follows
    that file: ``reload()`` picks up a rotation made by another process."""

    def __init__(
        self, key: bytes, *older: bytes, source: Path | None = None, ring_file: RingFile | None = None
    ) -> None:
        ring = []
        for k in (key, *older):
            if len(k) != 32:
                raise ConfigError("the master key must be 32 bytes (AES-256)")
            ring.append((key_id(k), k))
        if len({kid for kid, _ in ring}) != len(ring):
            raise ConfigError("the master key ring holds the same key twice")
        self._ring: tuple[tuple[str, bytes], ...] = tuple(ring)
        self._file = ring_file if ring_file is not None or source is None else PlainRingFile(source)
        self._stamp = self._source_stamp()

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(AESGCM.generate_key(bit_length=256))

    @classmethod
    def from_env_value(cls, value: str, source: Path | None = None) -> MasterKey:
        return cls(*_decode_ring(value, MASTER_KEY_ENV if source is None else str(source)), source=source)

    @classmethod
    def load(cls, path: Path) -> MasterKey:
        env_value = os.environ.get(MASTER_KEY_ENV)
        if env_value:
            return cls.from_env_value(env_value)
        return cls.from_ring_file(PlainRingFile(path))

    @classmethod
    def from_ring_file(cls, ring_file: RingFile) -> MasterKey:
        return cls(*ring_file.read(), ring_file=ring_file)

    @property
    def source(self) -> Path | None:
        """The file the ring follows; None when it came from the environment."""
        return self._file.path if self._file is not None else None

    @property
    def ring_file(self) -> RingFile | None:
        return self._file

    @property
    def kind(self) -> str:
        """Where the ring is kept: ``file``, ``pkcs11`` (wrapped in an HSM) or ``environment``."""
        return self._file.kind if self._file is not None else "environment"

    def describe(self) -> str:
        return self._file.describe() if self._file is not None else MASTER_KEY_ENV

    @property
    def current_id(self) -> str:
        return self._ring[0][0]

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(kid for kid, _ in self._ring)

    def serialise(self) -> str:
        return "".join(base64.b64encode(k).decode() + "\n" for _, k in self._ring)

    def with_new_current(self) -> MasterKey:
        """The ring with a fresh key in front (not saved)."""
        return MasterKey(
            AESGCM.generate_key(bit_length=256), *(k for _, k in self._ring), ring_file=self._file
        )

    def only_current(self) -> MasterKey:
        return MasterKey(self._ring[0][1], ring_file=self._file)

    def persist(self) -> None:
        """Write this ring over the file it follows (atomically)."""
        if self._file is None:
            raise ConfigError(f"the master key comes from {MASTER_KEY_ENV}: there is no file to write")
        self._file.write([k for _, k in self._ring])
        self._stamp = self._source_stamp()

    def save(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.serialise())

    def _source_stamp(self) -> tuple[int, int] | None:
        if self._file is None or not self._file.path.exists():
            return None  # not written yet (a ring being created)
        st = os.stat(self._file.path)
        return st.st_mtime_ns, st.st_ino

    def reload(self) -> bool:
        """Re-read the key file if it changed; True if the ring did."""
        if self._file is None or self._source_stamp() == self._stamp:
            return False
        stamp = self._source_stamp()
        fresh = MasterKey.from_ring_file(self._file)
        changed = fresh.key_ids != self.key_ids
        self._ring, self._stamp = fresh._ring, stamp
        return changed

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        kid, key = self._ring[0]
        header = _RING_MAGIC + bytes.fromhex(kid)
        nonce = os.urandom(_NONCE)
        return header + nonce + AESGCM(key).encrypt(nonce, plaintext, header + aad)

    def unseal(self, sealed: bytes, aad: bytes) -> bytes:
        kid = sealed_by(sealed)
        if kid == LEGACY_KEY_ID:
            return self._unseal_legacy(sealed, aad)
        ring = dict(self._ring)
        if kid not in ring:
            raise IntegrityError(
                f"stored ciphertext was sealed by master key {kid}, which is not in the key ring "
                f"(holds {', '.join(self.key_ids)})"
            )
        header = sealed[: len(_RING_MAGIC) + _KEY_ID]
        body = sealed[len(header) :]
        if len(body) < _NONCE + _TAG:
            raise IntegrityError("stored ciphertext is malformed")
        try:
            return AESGCM(ring[kid]).decrypt(body[:_NONCE], body[_NONCE:], header + aad)
        except InvalidTag as exc:
            raise IntegrityError(
                "stored ciphertext failed authentication (tampered, or another key)"
            ) from exc

    def _unseal_legacy(self, sealed: bytes, aad: bytes) -> bytes:
        error: IntegrityError | None = None
        for _, key in self._ring:
            try:
                return unseal(key, sealed, aad)
            except IntegrityError as exc:
                error = exc
        assert error is not None
        raise error

    def is_current(self, sealed: bytes) -> bool:
        return sealed.startswith(_RING_MAGIC + bytes.fromhex(self.current_id))

    def reseal(self, sealed: bytes, aad: bytes) -> bytes:
        """``sealed`` under the current key (authenticated on the way)."""
        return self.seal(self.unseal(sealed, aad), aad)

    def legacy_material(self) -> tuple[bytes, ...]:
        """Each key of the ring, for recovering subkeys that data dirs made
        before key rings derived from the master key (the audit MAC key)."""
        return tuple(k for _, k in self._ring)

    def new_data_key(self, aad: bytes) -> tuple[bytes, bytes]:
        """A fresh data key and its wrapped form, bound to ``aad``."""
        data_key = AESGCM.generate_key(bit_length=256)
        return data_key, self.seal(data_key, b"data-key:" + aad)

    def unwrap_data_key(self, wrapped: bytes, aad: bytes) -> bytes:
        return self.unseal(wrapped, b"data-key:" + aad)

    def rewrap_data_key(self, wrapped: bytes, aad: bytes) -> bytes:
        return self.reseal(wrapped, b"data-key:" + aad)


def read_key_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise ConfigError(f"master key not found at {path} and {MASTER_KEY_ENV} is not set") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"master key file {path} must not be readable by group or others (chmod 600)")
    return path.read_text()
