"""Job logs: sealed per entry under the job's data key, stored once per batch
sequence number, and woken followers.

A follower registers a watch on its job for as long as it follows, and only
for a job that exists (the caller checks first); the watch goes when the last
follower of that job does, however it leaves (end, error or cancellation).
Nothing is kept for a job nobody follows, so made-up job ids cost nothing.

Each stored batch carries its link of the job's log hash chain (common/evidence.py), over
the entries as the agent sent them (masked, before sealing), computed in the transaction
that stores the batch from the link before it: a replay stores nothing and links nothing.

While a job has followers, the batches this control plane stored for it last are kept in
memory too (its watch's tail, at the offsets the store gave them), so a live follower gets
a new batch without reading back and unsealing what was just written. The tail is only
ever what was stored here, contiguous; a follower whose offset it does not hold (behind
it, or a batch another replica stored) reads the store as before."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog

from testhide.common.evidence import log_chain_next
from testhide.controlplane.atrest import MasterKey, seal, unseal
from testhide.controlplane.errors import ControlPlaneError, IntegrityError
from testhide.controlplane.jobs.model import Job, LogBatchRecord, LogChunk, LogStream
from testhide.controlplane.jobs.store import LogStore

if TYPE_CHECKING:
    from testhide.controlplane.auth.audit import Auditor
    from testhide.controlplane.store.base import StoredLogBatch

READ_PAGE = 256
TAIL_BYTES = 2 * 1024 * 1024
"""Log bytes kept in memory for each followed job (at least its latest batch)."""
TAILS_BYTES = 64 * 1024 * 1024
"""Log bytes kept in memory for all followed jobs together: past it, a job's new batch
replaces its tail only if that keeps within the bound, else its followers read the store."""
BATCH_PAGE = 16
"""Log batches read at a time for a download: at most 1 MiB each (the agent's batch bound)."""
_KEY_CACHE = 1024
LOG_CHAIN_MISMATCH = "log_chain_mismatch"

log = structlog.get_logger("testhide.jobs.logs")


def entry_aad(job_id: str, seq: int, index: int) -> bytes:
    """What a stored entry's sealing binds it to: its job, batch and place in the batch."""
    return f"log:{job_id}:{seq}:{index}".encode()


class LogWatch:
    """The followers of one job, the event the next change of it sets, and the tail: the
    chunks of the batches last stored here, contiguous, at their offsets in the job's log."""

    __slots__ = ("event", "followers", "tail", "tail_bytes")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.followers = 0
        self.tail: deque[LogChunk] = deque()
        self.tail_bytes = 0

    def changed(self) -> asyncio.Event:
        """Take this before looking at the job; it is set by the next change after that."""
        return self.event

    @property
    def tail_end(self) -> int:
        last = self.tail[-1] if self.tail else None
        return last.offset + len(last.data) if last is not None else -1

    def stored(self, chunks: list[LogChunk], room: int) -> int:
        """Add a batch stored from ``chunks[0].offset`` on; the change in bytes kept. A batch
        that does not continue the tail starts it afresh; older batches leave past TAIL_BYTES;
        a batch that does not fit in ``room`` (more bytes) leaves the tail empty."""
        before = self.tail_bytes
        if not self.tail or self.tail_end != chunks[0].offset:
            self.tail.clear()
            self.tail_bytes = 0
        batch = sum(len(c.data) for c in chunks)
        self.tail.extend(chunks)
        self.tail_bytes += batch
        while self.tail_bytes > max(TAIL_BYTES, batch) and len(self.tail) > len(chunks):
            self.tail_bytes -= len(self.tail.popleft().data)
        if self.tail_bytes - before > room:
            self.tail.clear()
            self.tail_bytes = 0
        return self.tail_bytes - before

    def from_tail(self, offset: int) -> list[LogChunk] | None:
        """The chunks from byte ``offset`` to the tail's end, if the tail holds that offset."""
        if not self.tail or not self.tail[0].offset <= offset < self.tail_end:
            return None
        chunks = []
        for chunk in self.tail:
            end = chunk.offset + len(chunk.data)
            if end <= offset:
                continue
            skip = max(0, offset - chunk.offset)
            chunks.append(LogChunk(chunk.offset + skip, chunk.stream, chunk.data[skip:]) if skip else chunk)
        return chunks


class LogBook:
    def __init__(self, store: LogStore, master: MasterKey) -> None:
        self._store = store
        self._master = master
        self._keys: OrderedDict[str, bytes] = OrderedDict()
        self._watches: dict[str, LogWatch] = {}
        self._tails_bytes = 0

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
            (stream, seal(key, data, entry_aad(job_id, seq, i)), len(data))
            for i, (stream, data) in enumerate(kept)
        ]

        def link(previous: bytes) -> bytes:
            return log_chain_next(previous, seq, [(int(stream), data) for stream, data in kept])

        at: list[int] = []
        stored = await self._store.append_log_batch(
            org, job_id, agent_id, epoch, seq, sealed, link, at=at.append
        )
        if at and kept and (watch := self._watches.get(job_id)) is not None:
            chunks, offset = [], at[-1]
            for stream, data in kept:
                chunks.append(LogChunk(offset, stream, data))
                offset += len(data)
            self._tails_bytes += watch.stored(chunks, TAILS_BYTES - self._tails_bytes)
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
                self._tails_bytes -= watch.tail_bytes
                watch.tail.clear()

    @property
    def watched_jobs(self) -> int:
        """Jobs with at least one follower now."""
        return len(self._watches)

    @property
    def tail_bytes(self) -> int:
        """Log bytes kept in memory for followers now (every followed job's tail)."""
        return self._tails_bytes

    async def read(
        self, org: str, job_id: str, offset: int, known_size: int | None = None
    ) -> AsyncIterator[LogChunk]:
        """Chunks from byte ``offset`` to what is stored now (the caller has found the job in
        ``org``): from the job's tail when it holds ``offset``, then from the store, which is
        not asked when the tail reached ``known_size`` (the job's log size as last read)."""
        watch = self._watches.get(job_id)
        if watch is not None and (chunks := watch.from_tail(offset)) is not None:
            for chunk in chunks:
                yield chunk
            offset = chunks[-1].offset + len(chunks[-1].data)
            if known_size is not None and offset >= known_size:
                return
        key = await self._data_key(org, job_id)
        while True:
            rows = await self._store.read_log(org, job_id, offset, READ_PAGE)
            progressed = False
            for row in rows:
                data = unseal(key, row.sealed, entry_aad(job_id, row.seq, row.index))
                end = row.offset + len(data)
                if end <= offset:
                    continue
                skip = max(0, offset - row.offset)
                yield LogChunk(row.offset + skip, row.stream, data[skip:])
                offset, progressed = end, True
            if len(rows) < READ_PAGE or not progressed:
                return

    async def batches(self, org: str, job_id: str) -> AsyncIterator[LogBatchRecord]:
        """Every stored batch of the job, unsealed, with its chain link, in seq order (a
        page of them in memory at a time)."""
        key = await self._data_key(org, job_id)
        after = 0
        while page := await self._store.read_log_batches(org, job_id, after, BATCH_PAGE):
            for batch in page:
                yield LogBatchRecord(batch.seq, batch.chain, _unsealed(key, job_id, batch))
            after = page[-1].seq


def _unsealed(key: bytes, job_id: str, batch: StoredLogBatch) -> tuple[tuple[LogStream, bytes], ...]:
    entries = []
    for stream, sealed, index in batch.entries:
        try:
            entries.append((stream, unseal(key, sealed, entry_aad(job_id, batch.seq, index))))
        except IntegrityError as exc:
            raise IntegrityError(
                f"log batch {batch.seq} of job {job_id} fails authentication at rest (entry {index}):"
                " it was altered or moved in the database"
            ) from exc
    return tuple(entries)


async def check_log_chain(job: Job, auditor: Auditor | None = None) -> None:
    """Once a job's result is stored: say so, in the log and the audit log, when the head its
    agent reported differs from the head of the batches stored. Both are kept and the result
    stands; verifying the job's log will fail."""
    stored, reported = job.log_chain_head, job.agent_log_chain_head
    if not (stored and reported) or stored == reported:
        return  # they agree, or one side predates the chain: nothing to compare
    heads: dict[str, Any] = {
        "stored_head": stored.hex(),
        "agent_head": reported.hex(),
        "last_seq": job.last_seq,
    }
    log.warning(LOG_CHAIN_MISMATCH, job_id=job.id, agent_id=job.agent_id, **heads)
    if auditor is None:
        return
    try:
        await auditor.record(LOG_CHAIN_MISMATCH, f"agent:{job.agent_id}", org=job.org, target=job.id, **heads)
    except ControlPlaneError as exc:  # the result is stored all the same; the log line above has it
        log.error("audit_record_failed", action=LOG_CHAIN_MISMATCH, job_id=job.id, error=str(exc))
