"""Job logs: sealed per entry under the job's data key, stored once per batch
sequence number, and woken followers."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator

from testhide.controlplane.atrest import MasterKey, seal, unseal
from testhide.controlplane.jobs.model import LogChunk, LogStream
from testhide.controlplane.store.base import Store

READ_PAGE = 256
_KEY_CACHE = 1024


def _aad(job_id: str, seq: int, index: int) -> bytes:
    return f"log:{job_id}:{seq}:{index}".encode()


class LogBook:
    def __init__(self, store: Store, master: MasterKey) -> None:
        self._store = store
        self._master = master
        self._keys: OrderedDict[str, bytes] = OrderedDict()
        self._changed: dict[str, asyncio.Event] = {}

    async def _data_key(self, org: str, job_id: str) -> bytes:
        key = self._keys.get(job_id)
        if key is None:
            wrapped = await self._store.get_job_data_key(org, job_id)
            key = self._master.unwrap_data_key(wrapped, aad=job_id.encode())
            self._keys[job_id] = key
            if len(self._keys) > _KEY_CACHE:
                self._keys.popitem(last=False)
        self._keys.move_to_end(job_id)
        return key

    async def append(
        self, org: str, job_id: str, epoch: int, seq: int, entries: list[tuple[LogStream, bytes]]
    ) -> int:
        key = await self._data_key(org, job_id)
        kept = [(stream, data) for stream, data in entries if data]
        sealed = [
            (stream, seal(key, data, _aad(job_id, seq, i)), len(data))
            for i, (stream, data) in enumerate(kept)
        ]
        stored = await self._store.append_log_batch(org, job_id, epoch, seq, sealed)
        self.notify(job_id)
        return stored

    def notify(self, job_id: str) -> None:
        """Wake the followers of a job (new log bytes, or the job ended)."""
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    def changed(self, job_id: str) -> asyncio.Event:
        return self._changed.setdefault(job_id, asyncio.Event())

    async def read(self, org: str, job_id: str, offset: int) -> AsyncIterator[LogChunk]:
        """Chunks from byte ``offset`` to what is stored now."""
        key = await self._data_key(org, job_id)
        while True:
            rows = await self._store.read_log(org, job_id, offset, READ_PAGE)
            progressed = False
            for row in rows:
                data = unseal(key, row.sealed, _aad(job_id, row.seq, row.index))
                end = row.offset + len(data)
                if end <= offset:
                    continue
                skip = max(0, offset - row.offset)
                yield LogChunk(row.offset + skip, row.stream, data[skip:])
                offset, progressed = end, True
            if len(rows) < READ_PAGE or not progressed:
                return
