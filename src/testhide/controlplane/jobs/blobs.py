"""Workspaces, artifacts and test reports at rest: stored in chunks, each
sealed with AES-256-GCM under the blob's own data key (wrapped by the master
key), with the chunk's position bound in, so chunks cannot be swapped or
truncated unnoticed."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from testhide.controlplane.atrest import MasterKey, seal, unseal
from testhide.controlplane.errors import IntegrityError, InvalidArgument
from testhide.controlplane.jobs.model import BlobInfo
from testhide.controlplane.jobs.store import BlobStore

CHUNK = 1024 * 1024


def last_chunk_index(size: int) -> int:
    """``write`` fills chunks of CHUNK bytes and always writes a last one (maybe empty)."""
    return max(0, -(-size // CHUNK) - 1)


def _aad(blob_id: str, index: int, last: bool) -> bytes:
    return f"blob:{blob_id}:{index}:{'last' if last else 'more'}".encode()


class BlobVault:
    def __init__(self, store: BlobStore, master: MasterKey) -> None:
        self._store = store
        self._master = master

    async def write(
        self, org: str, kind: str, job_id: str | None, path: str, chunks: AsyncIterator[bytes], max_size: int
    ) -> BlobInfo:
        """Store what ``chunks`` yields; over ``max_size`` nothing is kept."""
        blob_id = "b" + secrets.token_hex(12)
        data_key, wrapped = self._master.new_data_key(aad=blob_id.encode())
        await self._store.create_blob(blob_id, org, kind, job_id, path, wrapped, datetime.now(UTC))
        digest, size, index, pending = hashlib.sha256(), 0, 0, b""
        try:
            async for data in chunks:
                size += len(data)
                if size > max_size:
                    raise InvalidArgument(f"{kind} is larger than the limit of {max_size} bytes")
                digest.update(data)
                pending += data
                while len(pending) > CHUNK:
                    await self._store.add_blob_chunk(
                        blob_id, index, seal(data_key, pending[:CHUNK], _aad(blob_id, index, False))
                    )
                    pending, index = pending[CHUNK:], index + 1
            await self._store.add_blob_chunk(
                blob_id, index, seal(data_key, pending, _aad(blob_id, index, True))
            )
            await self._store.complete_blob(blob_id, size, digest.hexdigest())
        except BaseException:
            await self._store.delete_blob(blob_id)
            raise
        return BlobInfo(blob_id, org, kind, job_id, path, size, digest.hexdigest())

    async def read(self, info: BlobInfo, wrapped_key: bytes) -> AsyncIterator[bytes]:
        """The blob's bytes, authenticated chunk by chunk and as a whole."""
        data_key = self._master.unwrap_data_key(wrapped_key, aad=info.id.encode())
        digest = hashlib.sha256()
        last = last_chunk_index(info.size)
        for index in range(last + 1):
            sealed = await self._store.blob_chunk(info.id, index)
            if sealed is None:
                raise IntegrityError(f"{info.kind} {info.path or info.id} is truncated")
            data = unseal(data_key, sealed, _aad(info.id, index, index == last))
            digest.update(data)
            yield data
        if digest.hexdigest() != info.sha256:
            raise IntegrityError(f"{info.kind} {info.path or info.id} does not match its sha256")
