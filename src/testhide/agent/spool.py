"""Log batches not yet sent, on disk: one append-only file per job, read back
in order. The outbox keeps only what is in flight in memory, so an agent cut
off from the control plane holds a long job's output here, up to a bound.

A disk that refuses a write (full, over quota, gone read-only) loses nothing:
the write is undone, and the outbox may keep that batch in memory instead
(``put(..., may_hold=True)``), in its place in the job's order. Later batches
try the disk again, so once space returns the spool resumes on its own. The
agent logs one warning when writes start failing (with the path and errno) and
one line when the disk takes them again.

While the agent is connected, a batch that waits only for the in-flight window
(several jobs writing at once) is kept in memory instead, up to a bound
(``put(..., in_memory=True)``): it goes out within moments, and writing it to
disk and reading it back would cost CPU for nothing."""

from __future__ import annotations

import errno
import os
import shutil
import struct
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from testhide.agent.model import LogBatch, LogStream

log = structlog.get_logger("testhide.agent.spool")

_ENTRY = struct.Struct(">BI")  # stream, length


@dataclass(frozen=True)
class _Record:
    seq: int
    offset: int
    length: int
    size: int
    """Bytes of log data (what counts against the bound)."""
    held: bytes | None = None
    """The encoded batch, kept in memory because the disk refused it."""
    kept: tuple[tuple[LogStream, bytes], ...] | None = None
    """The batch's entries, kept in memory while connected (never written)."""


@dataclass
class _JobFile:
    path: Path
    epoch: int
    end: int = 0
    records: deque[_Record] = field(default_factory=deque)
    spilled: bool = False
    """Some batch went to disk (or was held because the disk refused it)."""


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
        """Log bytes spooled and not yet taken back out (on disk and held)."""
        self.held = 0
        """Of those, the bytes held in memory because the disk refused them."""
        self.kept = 0
        """Of those, the bytes kept in memory while connected (``put(..., in_memory=True)``)."""
        self.failing: OSError | None = None
        """Why the last write to disk failed, until one succeeds again."""

    def pending(self, job_id: str) -> int:
        job = self._jobs.get(job_id)
        return len(job.records) if job else 0

    def next_size(self, job_id: str) -> int:
        """Log bytes of the job's oldest spooled batch."""
        return self._jobs[job_id].records[0].size

    def put(self, batch: LogBatch, may_hold: bool = False, in_memory: bool = False) -> bool:
        """Append the batch to the job's file, or keep it in memory as it is when
        ``in_memory``; if the disk refuses it, keep it in memory when ``may_hold``.
        False (nothing kept) when neither took it."""
        job = self._jobs.get(batch.job_id)
        if job is None:
            job = self._jobs[batch.job_id] = _JobFile(self.directory / f"{batch.job_id}.spool", batch.epoch)
        size = sum(len(data) for _, data in batch.entries)
        if in_memory:
            job.records.append(_Record(batch.seq, 0, 0, size, kept=batch.entries))
            self.kept += size
            self.size += size
            return True
        job.spilled = True
        raw = encode(batch.entries)
        try:
            self._write(job, raw)
        except OSError as exc:
            self._failed(job.path, exc)
            if not may_hold:
                if not job.records:
                    self._jobs.pop(batch.job_id)
                return False
            job.records.append(_Record(batch.seq, 0, len(raw), size, raw))
            self.held += size
        else:
            self._recovered(job.path)
            job.records.append(_Record(batch.seq, job.end, len(raw), size))
            job.end += len(raw)
        self.size += size
        return True

    def _write(self, job: _JobFile, raw: bytes) -> None:
        """All of ``raw`` at the end of the job's file, or nothing (a short write is undone)."""
        fd = os.open(job.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            written = 0
            while written < len(raw):
                written += os.pwrite(fd, raw[written:], job.end + written)
        except OSError:
            with suppress(OSError):
                os.ftruncate(fd, job.end)  # give back what a partial write took
            raise
        finally:
            os.close(fd)

    def _failed(self, path: Path, exc: OSError) -> None:
        if self.failing is None:
            log.warning(
                "spool_write_failed",
                path=str(path),
                errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                error=exc.strerror or str(exc),
                note="job output is held in memory, then read more slowly, until the disk takes it"
                " again or the control plane is back; nothing is dropped",
            )
        self.failing = exc

    def _recovered(self, path: Path) -> None:
        if self.failing is not None:
            self.failing = None
            log.info("spool_writable_again", path=str(path))

    def take(self, job_id: str) -> LogBatch:
        """The job's oldest spooled batch, removed from the spool."""
        job = self._jobs[job_id]
        record = job.records.popleft()
        self.size -= record.size
        if record.kept is not None:
            self.kept -= record.size
            entries = record.kept
        elif record.held is not None:
            self.held -= record.size
            entries = decode(record.held)
        else:
            entries = decode(self._read(job.path, record))
        if not job.records:
            self.discard(job_id)  # all read back: start the file afresh
            if job.spilled:
                log.info("spool_drained", job_id=job_id, path=str(job.path))
        return LogBatch(job_id, job.epoch, record.seq, entries)

    @staticmethod
    def _read(path: Path, record: _Record) -> bytes:
        """The record as written; a record the disk cannot give back (an I/O error,
        the file removed) becomes a line saying so, so the job's log and its
        sequence numbers go on."""
        try:
            with open(path, "rb") as handle:
                handle.seek(record.offset)
                raw = handle.read(record.length)
            if len(raw) == record.length:
                return raw
            error = f"the file ends after {len(raw)} of {record.length} bytes"
        except OSError as exc:
            error = exc.strerror or str(exc)
        log.warning("spool_read_failed", path=str(path), seq=record.seq, error=error)
        note = f"\n[testhide: {record.size} bytes of output lost: the agent could not read them ({error})]\n"
        return encode(((LogStream.SYSTEM, note.encode()),))

    def discard(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        self.size -= sum(r.size for r in job.records)
        self.held -= sum(r.size for r in job.records if r.held is not None)
        self.kept -= sum(r.size for r in job.records if r.kept is not None)
        if job.spilled:
            job.path.unlink(missing_ok=True)
