"""Job logs: sealed per entry under the job's data key, stored once per batch
sequence number, and woken followers.

A follower registers a watch on its job for as long as it follows, and only
for a job that exists (the caller checks first); the watch goes when the last
follower of that job does, however it leaves (end, error or cancellation).
Nothing is kept for a job nobody follows, so made-up job ids cost nothing."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from testhide.controlplane.atrest import MasterKey, seal, unseal
from testhide.controlplane.jobs.model import LogChunk, LogStream
from testhide.controlplane.jobs.store import LogStore

READ_PAGE = 256
_KEY_CACHE = 1024


def _aad(job_id: str, seq: int, index: int) -> bytes:
    return f"log:{job_id}:{seq}:{index}".encode()


class LogWatch:
    """The followers of one job, and the event the next change of it sets."""

    __slots__ = ("event", "followers")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.followers = 0

    def changed(self) -> asyncio.Event:
        """Take this before looking at the job; it is set by the next change after that."""
        return self.event


class LogBook:
    def __init__(self, store: LogStore, master: MasterKey) -> None:
        self._store = store
        self._master = master
        self._keys: OrderedDict[str, bytes] = OrderedDict()
        self._watches: dict[str, LogWatch] = {}

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
        self,
        org: str,
        agent_id: str,
        job_id: str,
        epoch: int,
        seq: int,
        entries: list[tuple[LogStream, bytes]],
    ) -> int:
        """Store the holding agent's batch ``seq`` once; the highest contiguous seq stored."""
        if job_id not in self._keys:
            # Nothing of a job is looked up for an agent that does not hold it: its answer
            # must be the one a job that does not exist gets.
            await self._store.held_job(org, job_id, agent_id, epoch)
        key = await self._data_key(org, job_id)
        kept = [(stream, data) for stream, data in entries if data]
        sealed = [
            (stream, seal(key, data, _aad(job_id, seq, i)), len(data))
            for i, (stream, data) in enumerate(kept)
        ]
        stored = await self._store.append_log_batch(org, job_id, agent_id, epoch, seq, sealed)
        self.notify(job_id)
        return stored

    def notify(self, job_id: str) -> None:
        """Wake the followers of a job (new log bytes, or the job ended)."""
        watch = self._watches.get(job_id)
        if watch is not None:
            watch.event.set()
            watch.event = asyncio.Event()

    @contextmanager
    def watch(self, job_id: str) -> Iterator[LogWatch]:
        """Follow ``job_id`` (which the caller has found) for the length of the block."""
        watch = self._watches.get(job_id)
        if watch is None:
            watch = self._watches[job_id] = LogWatch()
        watch.followers += 1
        try:
            yield watch
        finally:
            watch.followers -= 1
            if watch.followers == 0 and self._watches.get(job_id) is watch:
                del self._watches[job_id]

    @property
    def watched_jobs(self) -> int:
        """Jobs with at least one follower now."""
        return len(self._watches)

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
