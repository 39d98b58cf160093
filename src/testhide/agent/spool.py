"""Log batches not yet sent, on disk: one append-only file per job, read back
in order. The outbox keeps only what is in flight in memory, so an agent cut
off from the control plane holds a long job's output here, up to a bound."""

from __future__ import annotations

import os
import shutil
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from testhide.agent.model import LogBatch, LogStream

_ENTRY = struct.Struct(">BI")  # stream, length


@dataclass(frozen=True)
class _Record:
    seq: int
    offset: int
    length: int
    size: int
    """Bytes of log data (what counts against the bound)."""


@dataclass
class _JobFile:
    path: Path
    epoch: int
    end: int = 0
    records: deque[_Record] = field(default_factory=deque)


def encode(entries: tuple[tuple[LogStream, bytes], ...]) -> bytes:
    return b"".join(_ENTRY.pack(int(stream), len(data)) + data for stream, data in entries)


def decode(raw: bytes) -> tuple[tuple[LogStream, bytes], ...]:
    entries, at = [], 0
    while at < len(raw):
        stream, length = _ENTRY.unpack_from(raw, at)
        at += _ENTRY.size
        entries.append((LogStream(stream), raw[at : at + length]))
        at += length
    return tuple(entries)


class Spool:
    """Files are 0600 in a 0700 directory that is emptied at start: the jobs of
    an agent process that died are LOST on the control plane anyway."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o700, parents=True)
        self._jobs: dict[str, _JobFile] = {}
        self.size = 0
        """Log bytes spooled and not yet taken back out."""

    def pending(self, job_id: str) -> int:
        job = self._jobs.get(job_id)
        return len(job.records) if job else 0

    def next_size(self, job_id: str) -> int:
        """Log bytes of the job's oldest spooled batch."""
        return self._jobs[job_id].records[0].size

    def put(self, batch: LogBatch) -> None:
        job = self._jobs.get(batch.job_id)
        if job is None:
            job = self._jobs[batch.job_id] = _JobFile(self.directory / f"{batch.job_id}.spool", batch.epoch)
        raw = encode(batch.entries)
        fd = os.open(job.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, raw, job.end)
        finally:
            os.close(fd)
        size = sum(len(data) for _, data in batch.entries)
        job.records.append(_Record(batch.seq, job.end, len(raw), size))
        job.end += len(raw)
        self.size += size

    def take(self, job_id: str) -> LogBatch:
        """The job's oldest spooled batch, removed from the spool."""
        job = self._jobs[job_id]
        record = job.records.popleft()
        with open(job.path, "rb") as handle:
            handle.seek(record.offset)
            raw = handle.read(record.length)
        self.size -= record.size
        if not job.records:
            self.discard(job_id)  # all read back: start the file afresh
        return LogBatch(job_id, job.epoch, record.seq, decode(raw))

    def discard(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        self.size -= sum(r.size for r in job.records)
        job.path.unlink(missing_ok=True)
