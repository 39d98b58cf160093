"""Jobs' log batches and their chain links in the PostgreSQL store: mixed into PgStore
beside PgJobData (whose holder check a batch passes before it is stored)."""

from __future__ import annotations

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
from testhide.controlplane.store.pg_common import (
    PgConnection,
    PgParts,
)
from testhide.controlplane.store.pg_jobs import PgJobData


class PgJobLogs(PgParts):
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
        contiguous stored seq. ``entries`` are (stream, sealed data, plaintext length). The
        job's row lock orders concurrent batches of the job (and so its chain)."""

        async def run(c: PgConnection) -> int:
            row = await PgJobData._held_row(c, org, job_id, agent_id, epoch)
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
            offsets = []
            for _, _, length in entries:
                offsets.append(offset)
                offset += length
            if entries:
                await c.execute(
                    "INSERT INTO log_entries (job_id, seq, idx, byte_offset, stream, data)"
                    " SELECT $1, $2, e.idx - 1, e.byte_offset, e.stream, e.data"
                    " FROM unnest($3::bigint[], $4::int[], $5::bytea[]) WITH ORDINALITY"
                    " AS e(byte_offset, stream, data, idx)",
                    job_id,
                    seq,
                    offsets,
                    [int(stream) for stream, _, _ in entries],
                    [sealed for _, sealed, _ in entries],
                )
            chain = next_log_chain(job_id, last_seq, row["log_chain"], link)
            if chain is not None:
                await c.execute(
                    "INSERT INTO log_batches (job_id, seq, chain) VALUES ($1, $2, $3)", job_id, seq, chain
                )
            await c.execute(
                "UPDATE jobs SET last_seq = $1, log_size = $2, log_chain = $3 WHERE id = $4",
                seq,
                offset,
                chain,
                job_id,
            )
            return seq

        return await self._tx(run)

    async def read_log(self, org: str, job_id: str, from_offset: int, limit: int) -> list[StoredLogEntry]:
        rows = await self._fetch(
            "SELECT l.* FROM log_entries l JOIN jobs j ON j.id = l.job_id"
            " WHERE j.org = $1 AND l.job_id = $2 AND l.byte_offset >= ("
            "   SELECT COALESCE(MAX(byte_offset), 0) FROM log_entries"
            "   WHERE job_id = $2 AND byte_offset <= $3)"
            " ORDER BY l.byte_offset, l.seq, l.idx LIMIT $4",
            org,
            job_id,
            from_offset,
            limit,
        )
        return [
            StoredLogEntry(r["byte_offset"], LogStream(r["stream"]), bytes(r["data"]), r["seq"], r["idx"])
            for r in rows
        ]

    async def read_log_batches(
        self, org: str, job_id: str, after_seq: int, limit: int
    ) -> list[StoredLogBatch]:
        async def run(c: PgConnection) -> list[StoredLogBatch]:
            if await c.fetchrow("SELECT 1 FROM jobs WHERE org = $1 AND id = $2", org, job_id) is None:
                raise NotFound(f"job {job_id} not found")
            # A batch is what either table holds of it: a tampered store may have lost one side.
            seqs = [
                int(r["seq"])
                for r in await c.fetch(
                    "SELECT seq FROM log_batches WHERE job_id = $1 AND seq > $2"
                    " UNION SELECT seq FROM log_entries WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    job_id,
                    after_seq,
                    limit,
                )
            ]
            if not seqs:
                return []
            chains = await c.fetch(
                "SELECT seq, chain FROM log_batches WHERE job_id = $1 AND seq > $2 AND seq <= $3",
                job_id,
                after_seq,
                seqs[-1],
            )
            entries = await c.fetch(
                "SELECT seq, idx, stream, data FROM log_entries WHERE job_id = $1 AND seq > $2 AND seq <= $3"
                " ORDER BY seq, idx",
                job_id,
                after_seq,
                seqs[-1],
            )
            return log_batches_of(
                seqs,
                [(r["seq"], r["chain"]) for r in chains],
                [(r["seq"], r["idx"], r["stream"], r["data"]) for r in entries],
            )

        return await self._snapshot(run)
