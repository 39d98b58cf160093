"""Jobs' log batches and their chain links in the SQLite store: mixed into SqliteStore
beside SqliteJobData (whose holder check a batch passes before it is stored)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from testhide.controlplane.errors import FailedPrecondition, NotFound, NotHeld
from testhide.controlplane.jobs.model import (
    JobStatus,
    LogStream,
)
from testhide.controlplane.store.base import (
    StoredLogBatch,
    StoredLogEntry,
    log_batches_of,
    next_log_chain,
)
from testhide.controlplane.store.sqlite_common import (
    SqliteParts,
)
from testhide.controlplane.store.sqlite_jobs import SqliteJobData


class SqliteJobLogs(SqliteParts):
    async def append_log_batch(
        self,
        org: str,
        job_id: str,
        agent_id: str,
        epoch: int,
        seq: int,
        entries: list[tuple[LogStream, bytes, int]],
        link: Callable[[bytes], bytes] | None = None,
        at: Callable[[int], None] | None = None,
    ) -> int:
        """Store the holder's batch ``seq`` once, with its chain link; returns the highest
        contiguous stored seq. ``entries`` are (stream, sealed data, plaintext length)."""

        def run(c: sqlite3.Connection) -> int:
            row = SqliteJobData._held_row(c, org, job_id, agent_id, epoch)
            last_seq, offset = row["last_seq"], row["log_size"]
            if seq <= last_seq:
                return int(last_seq)  # a replay of a batch already stored
            if JobStatus(row["status"]) not in (JobStatus.ASSIGNED, JobStatus.RUNNING):
                raise NotHeld(job_id)  # it has ended: nothing more is taken
            if seq != last_seq + 1:
                raise FailedPrecondition(
                    f"log batch {seq} of job {job_id} arrived before batch {last_seq + 1}"
                )
            if at is not None:
                at(offset)
            for index, (stream, sealed, length) in enumerate(entries):
                c.execute(
                    "INSERT INTO log_entries VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, seq, index, offset, int(stream), sealed),
                )
                offset += length
            chain = next_log_chain(job_id, last_seq, row["log_chain"], link)
            if chain is not None:
                c.execute("INSERT INTO log_batches VALUES (?, ?, ?)", (job_id, seq, chain))
            c.execute(
                "UPDATE jobs SET last_seq = ?, log_size = ?, log_chain = ? WHERE id = ?",
                (seq, offset, chain, job_id),
            )
            return seq

        return await self._tx(run)

    async def read_log(self, org: str, job_id: str, from_offset: int, limit: int) -> list[StoredLogEntry]:
        rows = await self._query(
            "SELECT l.* FROM log_entries l JOIN jobs j ON j.id = l.job_id"
            " WHERE j.org = ? AND l.job_id = ? AND l.byte_offset >= ("
            "   SELECT COALESCE(MAX(byte_offset), 0) FROM log_entries WHERE job_id = ? AND byte_offset <= ?)"
            " ORDER BY l.byte_offset, l.seq, l.idx LIMIT ?",
            (org, job_id, job_id, from_offset, limit),
        )
        return [
            StoredLogEntry(r["byte_offset"], LogStream(r["stream"]), bytes(r["data"]), r["seq"], r["idx"])
            for r in rows
        ]

    async def read_log_batches(
        self, org: str, job_id: str, after_seq: int, limit: int
    ) -> list[StoredLogBatch]:
        def run(c: sqlite3.Connection) -> list[StoredLogBatch]:
            if c.execute("SELECT 1 FROM jobs WHERE org = ? AND id = ?", (org, job_id)).fetchone() is None:
                raise NotFound(f"job {job_id} not found")
            # A batch is what either table holds of it: a tampered store may have lost one side.
            seqs = [
                r[0]
                for r in c.execute(
                    "SELECT seq FROM log_batches WHERE job_id = ? AND seq > ?"
                    " UNION SELECT seq FROM log_entries WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (job_id, after_seq, job_id, after_seq, limit),
                )
            ]
            if not seqs:
                return []
            span = (job_id, after_seq, seqs[-1])
            chains = c.execute(
                "SELECT seq, chain FROM log_batches WHERE job_id = ? AND seq > ? AND seq <= ?", span
            )
            entries = c.execute(
                "SELECT seq, idx, stream, data FROM log_entries WHERE job_id = ? AND seq > ? AND seq <= ?"
                " ORDER BY seq, idx",
                span,
            )
            return log_batches_of(seqs, chains, entries)

        return await self._tx(run, write=False)
