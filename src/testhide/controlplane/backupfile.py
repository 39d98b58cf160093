"""The backup file format: a stream of AES-256-GCM chunks under a fresh data
key, wrapped by the master key. The master key itself is never inside; a ring
that an HSM wraps is, as the HSM wrapped it (``key_ring`` in the header, the
content of ``keyring.pkcs11``): it opens only inside that HSM.

    b"THBACKUP1\\n" || u32 header length || header (JSON) || records
    record = u32 length || nonce (12 bytes) || ciphertext+tag

Each chunk's associated data binds the header (so it cannot be swapped for
another backup's), the chunk's index (no reordering, no dropping from the
middle) and whether it is the last (no cutting off the end). A reader stops at
the first chunk that fails and never hands out unauthenticated bytes: it
writes the whole plaintext to ``dest`` only as it authenticates, and the
caller discards ``dest`` on any error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from testhide.controlplane.atrest import MasterKey, sealed_by
from testhide.controlplane.errors import IntegrityError

MAGIC = b"THBACKUP1\n"
CHUNK = 1024 * 1024
_LENGTH = struct.Struct(">I")
_NONCE = 12
_MAX_HEADER = 64 * 1024


@dataclass(frozen=True)
class BackupHeader:
    backup_id: str
    created_at: datetime
    master_key_id: str
    """The master key that wrapped this backup's data key: needed to restore."""
    wrapped_key: bytes
    key_ring: dict[str, Any] | None = None
    """The ring as an HSM wrapped it (``hsm.WrappedRing``), for rings kept in one; None otherwise."""

    def encode(self) -> bytes:
        fields: dict[str, Any] = {
            "format": 1,
            "backup_id": self.backup_id,
            "created_at": self.created_at.isoformat(),
            "master_key_id": self.master_key_id,
            "wrapped_key": base64.b64encode(self.wrapped_key).decode(),
            "note": "encrypted; the master key is not in this file and is needed to restore",
        }
        if self.key_ring is not None:
            fields["key_ring"] = self.key_ring
        return json.dumps(fields, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> BackupHeader:
        try:
            data: dict[str, Any] = json.loads(raw)
            if data.get("format") != 1:
                raise IntegrityError(f"unsupported backup format {data.get('format')!r}")
            return cls(
                str(data["backup_id"]),
                datetime.fromisoformat(data["created_at"]),
                str(data["master_key_id"]),
                base64.b64decode(data["wrapped_key"], validate=True),
                _key_ring(data.get("key_ring")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError("the backup header is damaged") from exc


def _key_ring(value: Any) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise TypeError("key_ring must be an object")
    return value


def _aad(header: bytes, index: int, last: bool) -> bytes:
    return b"testhide-backup:" + hashlib.sha256(MAGIC + header).digest() + struct.pack(">Q?", index, last)


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class BackupWriter:
    """A write-only file object that encrypts what it is given into ``out``."""

    def __init__(self, out: Writable, master: MasterKey, key_ring: dict[str, Any] | None = None) -> None:
        backup_id = secrets.token_hex(8)
        data_key, wrapped = master.new_data_key(b"backup:" + backup_id.encode())
        self.header = BackupHeader(backup_id, datetime.now(UTC), master.current_id, wrapped, key_ring)
        self._raw_header = self.header.encode()
        self._aead, self._out = AESGCM(data_key), out
        self._pending = bytearray()
        self._index = 0
        out.write(MAGIC + _LENGTH.pack(len(self._raw_header)) + self._raw_header)

    def write(self, data: bytes) -> int:
        self._pending += data
        while len(self._pending) > CHUNK:  # the last chunk is written by close()
            self._emit(bytes(self._pending[:CHUNK]), last=False)
            del self._pending[:CHUNK]
        return len(data)

    def _emit(self, plaintext: bytes, last: bool) -> None:
        nonce = os.urandom(_NONCE)
        sealed = nonce + self._aead.encrypt(nonce, plaintext, _aad(self._raw_header, self._index, last))
        self._out.write(_LENGTH.pack(len(sealed)) + sealed)
        self._index += 1

    def close(self) -> None:
        self._emit(bytes(self._pending), last=True)
        self._pending.clear()


def read_header(src: BinaryIO) -> tuple[BackupHeader, bytes]:
    if src.read(len(MAGIC)) != MAGIC:
        raise IntegrityError("not a testhide backup (wrong magic)")
    raw = _read_exact(src, _LENGTH.size, "header length")
    (length,) = _LENGTH.unpack(raw)
    if length > _MAX_HEADER:
        raise IntegrityError("the backup header is damaged")
    raw_header = _read_exact(src, length, "header")
    return BackupHeader.decode(raw_header), raw_header


def _read_exact(src: BinaryIO, size: int, what: str) -> bytes:
    data = src.read(size)
    if len(data) != size:
        raise IntegrityError(f"the backup is truncated (in the {what})")
    return data


def _next_record(src: BinaryIO, index: int) -> bytes | None:
    raw = src.read(_LENGTH.size)
    if not raw:
        return None
    if len(raw) != _LENGTH.size:
        raise IntegrityError(f"the backup is truncated (in chunk {index})")
    (length,) = _LENGTH.unpack(raw)
    if length > CHUNK + _NONCE + 16 or length < _NONCE + 16:
        raise IntegrityError(f"backup chunk {index} is damaged")
    return _read_exact(src, length, f"chunk {index}")


def decrypt(src: BinaryIO, master: MasterKey, dest: BinaryIO) -> BackupHeader:
    """Authenticate and decrypt the whole backup into ``dest``."""
    header, raw_header = read_header(src)
    if header.master_key_id not in master.key_ids or sealed_by(header.wrapped_key) not in master.key_ids:
        raise IntegrityError(
            f"this backup was encrypted under master key {header.master_key_id}; the key given "
            f"({', '.join(master.key_ids)}) is not it"
        )
    aead = AESGCM(master.unwrap_data_key(header.wrapped_key, b"backup:" + header.backup_id.encode()))
    record, index = _next_record(src, 0), 0
    if record is None:
        raise IntegrityError("the backup is truncated (no data)")
    while record is not None:
        following = _next_record(src, index + 1)
        try:
            dest.write(
                aead.decrypt(record[:_NONCE], record[_NONCE:], _aad(raw_header, index, following is None))
            )
        except InvalidTag as exc:
            if following is None:
                raise IntegrityError(
                    f"the backup is truncated or damaged at chunk {index} "
                    "(it does not end with its last chunk)"
                ) from exc
            raise IntegrityError(
                f"backup chunk {index} failed authentication (tampered, reordered or from another backup)"
            ) from exc
        record, index = following, index + 1
    return header
