"""Encryption at rest: AES-256-GCM under per-object data keys, themselves
wrapped (AES-GCM) by the master key. Nothing here invents cryptography; it only
decides nonces, associated data and layout.

Sealed layout: ``b"TH1" || nonce (12 bytes) || ciphertext+tag``.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from controlplane.errors import ConfigError, IntegrityError

MASTER_KEY_ENV = "TESTHIDE_MASTER_KEY"
_MAGIC = b"TH1"
_NONCE = 12


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return _MAGIC + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    if not sealed.startswith(_MAGIC) or len(sealed) < len(_MAGIC) + _NONCE + 16:
        raise IntegrityError("stored ciphertext is malformed")
    nonce = sealed[len(_MAGIC) : len(_MAGIC) + _NONCE]
    try:
        return AESGCM(key).decrypt(nonce, sealed[len(_MAGIC) + _NONCE :], aad)
    except InvalidTag as exc:
        raise IntegrityError("stored ciphertext failed authentication (tampered, or another key)") from exc


class MasterKey:
    """The key that wraps every data key. Read from a 0600 file in the data dir
    or, when the operator keeps it elsewhere, from ``TESTHIDE_MASTER_KEY``."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigError("the master key must be 32 bytes (AES-256)")
        self._key = key

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(AESGCM.generate_key(bit_length=256))

    @classmethod
    def from_env_value(cls, value: str) -> MasterKey:
        try:
            return cls(base64.b64decode(value, validate=True))
        except ValueError as exc:
            raise ConfigError(f"{MASTER_KEY_ENV} must be 32 bytes, base64-encoded") from exc

    @classmethod
    def load(cls, path: Path) -> MasterKey:
        env_value = os.environ.get(MASTER_KEY_ENV)
        if env_value:
            return cls.from_env_value(env_value)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError as exc:
            raise ConfigError(f"master key not found at {path} and {MASTER_KEY_ENV} is not set") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"master key file {path} must not be readable by group or others (chmod 600)")
        return cls.from_env_value(path.read_text().strip())

    def save(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(self._key).decode() + "\n")

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        return seal(self._key, plaintext, aad)

    def derive_material(self) -> bytes:
        """Input keying material for HKDF-derived subkeys (audit MACs)."""
        return self._key

    def unseal(self, sealed: bytes, aad: bytes) -> bytes:
        return unseal(self._key, sealed, aad)

    def new_data_key(self, aad: bytes) -> tuple[bytes, bytes]:
        """A fresh data key and its wrapped form, bound to ``aad``."""
        data_key = AESGCM.generate_key(bit_length=256)
        return data_key, self.seal(data_key, b"data-key:" + aad)

    def unwrap_data_key(self, wrapped: bytes, aad: bytes) -> bytes:
        return self.unseal(wrapped, b"data-key:" + aad)
