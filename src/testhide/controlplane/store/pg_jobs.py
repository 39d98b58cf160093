"""Jobs, their logs, test results, blobs, secrets and pool policies in the
PostgreSQL store: mixed into PgStore, which provides the connection pool.

Several control planes write concurrently under READ COMMITTED, where SQLite
had one writer at a time: every read that decides a write locks the job's row
first (``FOR UPDATE``: status and epoch checks, the log's ``last_seq``, the
transition counter), and assignment is an update conditional on QUEUED, so
two replicas never both claim a job. Reads of more than one statement run in
a read-only REPEATABLE READ snapshot, as SQLite's deferred transactions do.
Paths and names sort with ``COLLATE "C"``: byte order, as in SQLite, whatever
the database's locale."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TypeVar

from testhide.controlplane.errors import ControlPlaneError, FailedPrecondition, NotFound, NotHeld, StaleEpoch
from testhide.controlplane.jobs.model import (
    BlobInfo,
    FetchStep,
    Isolation,
    Job,
    JobFilter,
    JobReport,
    JobStatus,
    LogStream,
    PoolPolicy,
    PullPolicy,
    SecretInfo,
    TestCase,
    TestStatus,
    Transition,
)
from testhide.controlplane.store.base import StoredLogEntry
from testhide.controlplane.store.pg_common import (
    PgConnection,
    PgParts,
    Row,
    fetch_from_json,
    fetch_to_json,
    isolation_from_json,
    isolation_to_json,
    spec_from_json,
    spec_to_json,
)

T = TypeVar("T")

_TAKEN_BACK = (JobStatus.QUEUED.value, JobStatus.LOST.value)
_HELD_SQL = (
    "SELECT * FROM jobs"
    " WHERE org = $1 AND id = $2 AND agent_id = $3 AND epoch = $4 AND status NOT IN ($5, $6)"
)


def _job_of(r: Row, transitions: tuple[Transition, ...] = ()) -> Job:
    return Job(
        id=r["id"],
        org=r["org"],
        spec=spec_from_json(r["spec"]),
        status=JobStatus(r["status"]),
        created_at=r["created_at"],
        exit_code=r["exit_code"],
        status_reason=r["status_reason"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        agent_id=r["agent_id"],
        epoch=r["epoch"],
        log_size=r["log_size"],
        last_seq=r["last_seq"],
        transitions=transitions,
        attempt=r["attempt"],
        retry_of=r["retry_of"],
        retried_as=r["retried_as"],
        lease_expires_at=r["lease_expires_at"],
        isolation=isolation_from_json(r["isolation"]),
        fetch=fetch_from_json(r["fetch_step"]),
    )


def _transition(t: Row) -> Transition:
    return Transition(JobStatus(t["status"]), t["at"], t["reason"])


def _filter_sql(where: JobFilter, args: list[object]) -> str:
    """``where`` as SQL conditions (each starting " AND "), appending their
    arguments to ``args``: only placeholders reach the SQL text. Labels live in
    the spec's JSON (a text column): the spec's labels must contain all those
    asked for, given as one JSON object."""

    def bind(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    sql = ""
    if where.statuses:
        sql += f" AND status = ANY({bind(sorted(s.value for s in where.statuses))}::text[])"
    if where.labels:
        labels = json.dumps(dict(where.labels))
        sql += f" AND (spec::jsonb -> 'labels') @> {bind(labels)}::text::jsonb"
    if where.pool:
        sql += f" AND pool = {bind(where.pool)}"
    if where.since is not None:
        sql += f" AND created_at >= {bind(where.since)}"
    return sql


class PgJobData(PgParts):
    async def _snapshot(self, fn: Callable[[PgConnection], Awaitable[T]]) -> T:
        """``fn``'s reads in one snapshot (REPEATABLE READ, read only: never aborted for a race)."""

        async def run(c: PgConnection) -> T:
            await c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return await fn(c)

        return await self._tx(run)

    # jobs ----------------------------------------------------------------------
    @staticmethod
    async def _job(c: PgConnection, r: Row, with_transitions: bool = True) -> Job:
        if not with_transitions:
            return _job_of(r)
        rows = await c.fetch(
            "SELECT status, at, reason FROM job_transitions WHERE job_id = $1 ORDER BY n", r["id"]
        )
        return _job_of(r, tuple(_transition(t) for t in rows))

    @staticmethod
    async def _jobs(c: PgConnection, rows: Sequence[Row]) -> list[Job]:
        """``_job`` for many rows, with one query for all their transitions."""
        if not rows:
            return []
        transitions: dict[str, list[Transition]] = {r["id"]: [] for r in rows}
        for t in await c.fetch(
            "SELECT job_id, status, at, reason FROM job_transitions WHERE job_id = ANY($1::text[])"
            " ORDER BY job_id, n",
            list(transitions),
        ):
            transitions[t["job_id"]].append(_transition(t))
        return [_job_of(r, tuple(transitions[r["id"]])) for r in rows]

    @staticmethod
    async def _add_transition(
        c: PgConnection, job_id: str, status: JobStatus, now: datetime, reason: str
    ) -> None:
        """The caller holds the job's row lock (``FOR UPDATE``, or it updated the row
        first), so no other transaction takes the same ``n`` meanwhile; this
        statement's snapshot, taken after the lock, sees the last one committed."""
        await c.execute(
            "INSERT INTO job_transitions (job_id, n, status, at, reason)"
            " SELECT $1, COALESCE(MAX(n), 0) + 1, $2, $3, $4 FROM job_transitions WHERE job_id = $1",
            job_id,
            status.value,
            now,
            reason,
        )

    async def create_job(self, job: Job, data_key_wrapped: bytes) -> None:
        async def run(c: PgConnection) -> None:
            await c.execute(
                "INSERT INTO jobs"
                " (id, org, pool, spec, status, created_at, data_key, attempt, retry_of, retries)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                job.id,
                job.org,
                job.spec.pool,
                spec_to_json(job.spec),
                job.status.value,
                job.created_at,
                data_key_wrapped,
                job.attempt,
                job.retry_of,
                job.spec.retries,
            )
            await self._add_transition(c, job.id, job.status, job.created_at, "")

        await self._tx(run)

    async def get_job(self, org: str, job_id: str) -> Job | None:
        async def run(c: PgConnection) -> Job | None:
            row = await c.fetchrow("SELECT * FROM jobs WHERE org = $1 AND id = $2", org, job_id)
            return await self._job(c, row) if row else None

        return await self._snapshot(run)

    async def get_job_data_key(self, org: str, job_id: str) -> bytes:
        rows = await self._fetch("SELECT data_key FROM jobs WHERE org = $1 AND id = $2", org, job_id)
        if not rows:
            raise NotFound(f"job {job_id} not found")
        return bytes(rows[0]["data_key"])

    async def list_jobs(
        self, org: str, limit: int, before_id: str | None, where: JobFilter | None = None
    ) -> list[Job]:
        args: list[object] = [org]
        conditions = "org = $1"
        if before_id is not None:
            args.append(before_id)
            conditions += f" AND id < ${len(args)}"
        conditions += _filter_sql(where or JobFilter(), args)
        args.append(limit)
        # Only placeholders are interpolated: the values travel as arguments.
        sql = f"SELECT * FROM jobs WHERE {conditions} ORDER BY id DESC LIMIT ${len(args)}"  # noqa: S608

        async def run(c: PgConnection) -> list[Job]:
            return await self._jobs(c, await c.fetch(sql, *args))

        return await self._snapshot(run)

    async def queued_jobs(self, org: str, pool: str, limit: int) -> list[Job]:
        rows = await self._fetch(
            "SELECT * FROM jobs WHERE org = $1 AND pool = $2 AND status = $3"
            # a paused pool's queued jobs wait: the dispatcher does not see them
            " AND NOT EXISTS (SELECT 1 FROM pools p WHERE p.org = jobs.org AND p.name = jobs.pool"
            " AND p.paused <> 0) ORDER BY id LIMIT $4",
            org,
            pool,
            JobStatus.QUEUED.value,
            limit,
        )
        return [_job_of(r) for r in rows]  # the dispatcher's hot path: no transitions

    async def queued_pools(self) -> list[tuple[str, str]]:
        rows = await self._fetch(
            "SELECT DISTINCT org, pool FROM jobs WHERE status = $1"
            " AND NOT EXISTS (SELECT 1 FROM pools p WHERE p.org = jobs.org AND p.name = jobs.pool"
            " AND p.paused <> 0)",
            JobStatus.QUEUED.value,
        )
        return [(r["org"], r["pool"]) for r in rows]

    async def jobs_of_agent(self, org: str, agent_id: str) -> list[Job]:
        async def run(c: PgConnection) -> list[Job]:
            rows = await c.fetch(
                "SELECT * FROM jobs WHERE org = $1 AND agent_id = $2 AND status IN ($3, $4) ORDER BY id",
                org,
                agent_id,
                JobStatus.ASSIGNED.value,
                JobStatus.RUNNING.value,
            )
            return await self._jobs(c, rows)

        return await self._snapshot(run)

    async def assign_job(
        self, org: str, job_id: str, agent_id: str, now: datetime, lease_until: datetime
    ) -> Job | None:
        """QUEUED -> ASSIGNED with a new fencing epoch and a lease, or None if someone else won
        (the conditional update waits for a concurrent claim and then finds the job no longer QUEUED)."""

        return await self._tx(lambda c: self._assign(c, org, job_id, agent_id, now, lease_until))

    async def assign_jobs(
        self, org: str, pairs: Sequence[tuple[str, str]], now: datetime, lease_until: datetime
    ) -> list[Job | None]:
        # Rows are claimed in job id order: two such transactions never wait on each other in a cycle.
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])

        async def run(c: PgConnection) -> list[Job | None]:
            claimed: dict[int, Job | None] = {}
            for i in order:
                job_id, agent_id = pairs[i]
                claimed[i] = await self._assign(c, org, job_id, agent_id, now, lease_until, False)
            return [claimed[i] for i in range(len(pairs))]

        return await self._tx(run)

    async def _assign(
        self,
        c: PgConnection,
        org: str,
        job_id: str,
        agent_id: str,
        now: datetime,
        lease_until: datetime,
        with_transitions: bool = True,
    ) -> Job | None:
        row = await c.fetchrow(
            "UPDATE jobs SET status = $1, agent_id = $2, epoch = epoch + 1, lease_expires_at = $3"
            " WHERE org = $4 AND id = $5 AND status = $6 RETURNING *",
            JobStatus.ASSIGNED.value,
            agent_id,
            lease_until,
            org,
            job_id,
            JobStatus.QUEUED.value,
        )
        if row is None:
            return None
        await self._add_transition(c, job_id, JobStatus.ASSIGNED, now, f"agent {agent_id}")
        return await self._job(c, row, with_transitions)

    async def set_job_status(
        self,
        org: str,
        job_id: str,
        epoch: int | None,
        status: JobStatus,
        now: datetime,
        reason: str = "",
        exit_code: int | None = None,
    ) -> Job:
        async def run(c: PgConnection) -> Job:
            row = await c.fetchrow("SELECT * FROM jobs WHERE org = $1 AND id = $2 FOR UPDATE", org, job_id)
            if row is None:
                raise NotFound(f"job {job_id} not found")
            if epoch is not None and row["epoch"] != epoch:
                raise StaleEpoch(f"job {job_id} is no longer at epoch {epoch}")
            current = JobStatus(row["status"])
            if current == status:
                return await self._job(c, row)
            if current.terminal:
                raise FailedPrecondition(f"job {job_id} has already ended ({current.value})")
            return await self._apply_status(c, row, status, now, reason, exit_code)

        return await self._tx(run)

    async def _apply_status(
        self,
        c: PgConnection,
        row: Row,
        status: JobStatus,
        now: datetime,
        reason: str,
        exit_code: int | None,
        with_transitions: bool = True,
    ) -> Job:
        """Move the job in ``row`` (locked by the caller) to ``status``, with its timestamps
        and a transition."""
        started = now if status == JobStatus.RUNNING else row["started_at"]
        finished = now if status.terminal else None
        lease = None if status.terminal or status == JobStatus.QUEUED else row["lease_expires_at"]
        updated = await c.fetchrow(
            "UPDATE jobs SET status = $1, status_reason = $2, exit_code = $3, started_at = $4,"
            " finished_at = $5, lease_expires_at = $6 WHERE id = $7 RETURNING *",
            status.value,
            reason,
            exit_code,
            started,
            finished,
            lease,
            row["id"],
        )
        assert updated is not None  # the row is locked: it cannot have gone
        await self._add_transition(c, row["id"], status, now, reason)
        return await self._job(c, updated, with_transitions)

    @staticmethod
    async def _held_row(c: PgConnection, org: str, job_id: str, agent_id: str, epoch: int) -> Row:
        """The job's row, locked, if ``agent_id`` holds it at ``epoch``, else NotHeld:
        the one test every agent message about a job passes, inside the
        transaction that acts on it. Assigned to the agent at that epoch, and not
        taken back since (QUEUED again, or LOST: both move the epoch on and hold
        for nobody, not even at the epoch that follows the agent's own). A job
        that ended on its holder's report, or was canceled under it, stays its
        holder's, so replays of that report are answered. A row another
        transaction is changing is tested again at its committed version."""
        row = await c.fetchrow(_HELD_SQL + " FOR UPDATE", org, job_id, agent_id, epoch, *_TAKEN_BACK)
        if row is None:
            raise NotHeld(job_id)
        return row

    async def held_job(self, org: str, job_id: str, agent_id: str, epoch: int) -> Job:
        row = await self._read(lambda c: c.fetchrow(_HELD_SQL, org, job_id, agent_id, epoch, *_TAKEN_BACK))
        if row is None:
            raise NotHeld(job_id)
        return _job_of(row)

    async def report_job(
        self,
        org: str,
        job_id: str,
        agent_id: str,
        epoch: int,
        status: JobStatus,
        now: datetime,
        reason: str = "",
        exit_code: int | None = None,
        last_seq: int | None = None,
    ) -> tuple[Job, bool]:
        """What the holding agent reports (RUNNING, or how the job ended), checked and
        applied in one transaction; (job, whether it changed). A report the job
        is already past is a replay and changes nothing."""

        report = JobReport(org, agent_id, job_id, epoch, status, reason, exit_code, last_seq)
        return await self._tx(lambda c: self._report(c, report, now))

    async def report_jobs(
        self, reports: Sequence[JobReport], now: datetime
    ) -> list[tuple[Job, bool] | ControlPlaneError]:
        # Rows are locked in job id order (a job's own reports keep theirs): two such
        # transactions never wait on each other in a cycle.
        order = sorted(range(len(reports)), key=lambda i: reports[i].job_id)

        async def run(c: PgConnection) -> list[tuple[Job, bool] | ControlPlaneError]:
            outcomes: dict[int, tuple[Job, bool] | ControlPlaneError] = {}
            for i in order:
                try:
                    outcomes[i] = await self._report(c, reports[i], now)
                except (NotHeld, FailedPrecondition) as exc:  # raised before it wrote anything
                    outcomes[i] = exc
            return [outcomes[i] for i in range(len(reports))]

        return await self._tx(run)

    async def _report(self, c: PgConnection, report: JobReport, now: datetime) -> tuple[Job, bool]:
        """One holder's report, checked in full before anything is written."""
        row = await self._held_row(c, report.org, report.job_id, report.agent_id, report.epoch)
        if report.last_seq is not None and row["last_seq"] != report.last_seq:
            raise FailedPrecondition(
                f"result of job {report.job_id} arrived before its log ({row['last_seq']}/{report.last_seq})"
            )
        if report.isolation is not None:
            await c.execute(
                "UPDATE jobs SET isolation = $1 WHERE id = $2", isolation_to_json(report.isolation), row["id"]
            )
        current, status = JobStatus(row["status"]), report.status
        replay = current.terminal or current == status
        if replay or (status == JobStatus.RUNNING and current != JobStatus.ASSIGNED):
            return _job_of(row), False
        job = await self._apply_status(
            c, row, status, now, report.reason, report.exit_code, with_transitions=False
        )
        return job, True

    async def record_isolation(
        self, org: str, job_id: str, agent_id: str, epoch: int, isolation: Isolation
    ) -> None:
        async def run(c: PgConnection) -> None:
            await self._held_row(c, org, job_id, agent_id, epoch)
            await c.execute(
                "UPDATE jobs SET isolation = $1 WHERE id = $2", isolation_to_json(isolation), job_id
            )

        await self._tx(run)

    async def record_fetch(self, org: str, job_id: str, agent_id: str, epoch: int, fetch: FetchStep) -> None:
        async def run(c: PgConnection) -> None:
            await self._held_row(c, org, job_id, agent_id, epoch)
            await c.execute("UPDATE jobs SET fetch_step = $1 WHERE id = $2", fetch_to_json(fetch), job_id)

        await self._tx(run)

    async def append_log_batch(
        self,
        org: str,
        job_id: str,
        agent_id: str,
        epoch: int,
        seq: int,
        entries: list[tuple[LogStream, bytes, int]],
    ) -> int:
        """Store the holder's batch ``seq`` once; returns the highest contiguous
        stored seq. ``entries`` are (stream, sealed data, plaintext length). The
        job's row lock orders concurrent batches of the job."""

        async def run(c: PgConnection) -> int:
            row = await self._held_row(c, org, job_id, agent_id, epoch)
            last_seq, offset = row["last_seq"], row["log_size"]
            if seq <= last_seq:
                return int(last_seq)  # a replay of a batch already stored
            if JobStatus(row["status"]) not in (JobStatus.ASSIGNED, JobStatus.RUNNING):
                raise NotHeld(job_id)  # it has ended: nothing more is taken
            if seq != last_seq + 1:
                raise FailedPrecondition(
                    f"log batch {seq} of job {job_id} arrived before batch {last_seq + 1}"
                )
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
            await c.execute("UPDATE jobs SET last_seq = $1, log_size = $2 WHERE id = $3", seq, offset, job_id)
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

    # pool policy -----------------------------------------------------------------
    async def pool_policy(self, org: str, pool: str) -> PoolPolicy:
        rows = await self._fetch(
            "SELECT allowed_images, pull_policy, runtime, paused, egress_allow FROM pools"
            " WHERE org = $1 AND name = $2",
            org,
            pool,
        )
        if not rows:
            raise NotFound(f"pool {org}/{pool} not found")
        r = rows[0]
        return PoolPolicy(
            tuple(json.loads(r["allowed_images"])),
            PullPolicy(r["pull_policy"]),
            r["runtime"],
            bool(r["paused"]),
            tuple(json.loads(r["egress_allow"])),
        )

    async def set_pool_policy(self, org: str, pool: str, policy: PoolPolicy) -> None:
        async def run(c: PgConnection) -> None:
            changed = await c.execute(
                "UPDATE pools SET allowed_images = $1, pull_policy = $2, runtime = $3, egress_allow = $4"
                " WHERE org = $5 AND name = $6",
                json.dumps(list(policy.allowed_images)),
                policy.pull_policy.value,
                policy.runtime,
                json.dumps(list(policy.egress_allow)),
                org,
                pool,
            )
            if changed != 1:
                raise NotFound(f"pool {org}/{pool} not found")

        await self._tx(run)

    # blobs: workspaces, artifacts, reports ----------------------------------------
    async def create_blob(
        self, blob_id: str, org: str, kind: str, job_id: str | None, path: str, data_key: bytes, now: datetime
    ) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO blobs (id, org, kind, job_id, path, data_key, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                blob_id,
                org,
                kind,
                job_id,
                path,
                data_key,
                now,
            )
        )

    async def add_blob_chunk(self, blob_id: str, index: int, sealed: bytes) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO blob_chunks (blob_id, idx, data) VALUES ($1, $2, $3)", blob_id, index, sealed
            )
        )

    async def complete_blob(self, blob_id: str, size: int, sha256: str) -> None:
        """Mark complete; a complete blob of the same job, kind and path is replaced
        (its chunks go with it: ON DELETE CASCADE). NotFound if the blob is gone,
        replaced meanwhile by another upload to the same path that completed first."""

        async def run(c: PgConnection) -> None:
            row = await c.fetchrow(
                "UPDATE blobs SET size = $1, sha256 = $2, complete = 1 WHERE id = $3"
                " RETURNING job_id, kind, path",
                size,
                sha256,
                blob_id,
            )
            if row is None:
                raise NotFound(f"blob {blob_id} not found")
            if row["job_id"] is not None:
                await c.execute(
                    "DELETE FROM blobs WHERE job_id = $1 AND kind = $2 AND path = $3 AND id <> $4",
                    row["job_id"],
                    row["kind"],
                    row["path"],
                    blob_id,
                )

        await self._tx(run)

    async def delete_blob(self, blob_id: str) -> None:
        await self._tx(lambda c: c.execute("DELETE FROM blobs WHERE id = $1", blob_id))  # chunks: CASCADE

    @staticmethod
    def _blob(r: Row) -> BlobInfo:
        return BlobInfo(r["id"], r["org"], r["kind"], r["job_id"], r["path"], r["size"], r["sha256"])

    async def get_blob(self, org: str, blob_id: str) -> tuple[BlobInfo, bytes] | None:
        rows = await self._fetch(
            "SELECT * FROM blobs WHERE org = $1 AND id = $2 AND complete = 1", org, blob_id
        )
        return (self._blob(rows[0]), bytes(rows[0]["data_key"])) if rows else None

    async def find_blob(self, org: str, job_id: str, kind: str, path: str) -> tuple[BlobInfo, bytes] | None:
        rows = await self._fetch(
            "SELECT * FROM blobs WHERE org = $1 AND job_id = $2 AND kind = $3 AND path = $4 AND complete = 1",
            org,
            job_id,
            kind,
            path,
        )
        return (self._blob(rows[0]), bytes(rows[0]["data_key"])) if rows else None

    async def list_blobs(self, org: str, job_id: str, kind: str) -> list[BlobInfo]:
        rows = await self._fetch(
            "SELECT * FROM blobs WHERE org = $1 AND job_id = $2 AND kind = $3 AND complete = 1"
            ' ORDER BY path COLLATE "C"',
            org,
            job_id,
            kind,
        )
        return [self._blob(r) for r in rows]

    async def blob_chunk(self, blob_id: str, index: int) -> bytes | None:
        rows = await self._fetch(
            "SELECT data FROM blob_chunks WHERE blob_id = $1 AND idx = $2", blob_id, index
        )
        return bytes(rows[0]["data"]) if rows else None

    # secrets ---------------------------------------------------------------------
    async def put_secret(self, org: str, name: str, data_key: bytes, sealed: bytes, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO secrets (org, name, data_key, value, updated_at) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (org, name) DO UPDATE SET"
                " data_key = excluded.data_key, value = excluded.value, updated_at = excluded.updated_at",
                org,
                name,
                data_key,
                sealed,
                now,
            )
        )

    async def list_secrets(self, org: str) -> list[SecretInfo]:
        rows = await self._fetch(
            "SELECT name, updated_at, last_used_at, last_used_by_job FROM secrets WHERE org = $1"
            ' ORDER BY name COLLATE "C"',
            org,
        )
        return [
            SecretInfo(r["name"], r["updated_at"], r["last_used_at"], r["last_used_by_job"]) for r in rows
        ]

    async def record_secret_use(self, org: str, names: tuple[str, ...], job_id: str, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute(
                "UPDATE secrets SET last_used_at = $1, last_used_by_job = $2"
                " WHERE org = $3 AND name = ANY($4::text[])",
                now,
                job_id,
                org,
                list(names),
            )
        )

    async def delete_secret(self, org: str, name: str) -> datetime | None:
        row = await self._tx(
            lambda c: c.fetchrow(
                "DELETE FROM secrets WHERE org = $1 AND name = $2 RETURNING updated_at", org, name
            )
        )
        return row["updated_at"] if row else None

    async def get_secrets(self, org: str, names: tuple[str, ...]) -> dict[str, tuple[bytes, bytes]]:
        if not names:
            return {}
        rows = await self._fetch(
            "SELECT name, data_key, value FROM secrets WHERE org = $1 AND name = ANY($2::text[])",
            org,
            list(names),
        )
        return {r["name"]: (bytes(r["data_key"]), bytes(r["value"])) for r in rows}

    # test results ----------------------------------------------------------------
    async def record_test_report(self, job_id: str, path: str, cases: list[TestCase], error: str) -> None:
        """The report row is written first: its lock orders two writers of the same
        report, so the second deletes the cases the first committed."""

        async def run(c: PgConnection) -> None:
            await c.execute(
                "INSERT INTO test_reports (job_id, path, error) VALUES ($1, $2, $3)"
                " ON CONFLICT (job_id, path) DO UPDATE SET error = excluded.error",
                job_id,
                path,
                error,
            )
            await c.execute("DELETE FROM test_cases WHERE job_id = $1 AND path = $2", job_id, path)
            if cases:
                await c.execute(
                    "INSERT INTO test_cases"
                    " (job_id, path, n, suite, classname, name, duration_s, status, message)"
                    " SELECT $1, $2, t.n - 1, t.suite, t.classname, t.name, t.duration_s, t.status, t.message"
                    " FROM unnest($3::text[], $4::text[], $5::text[], $6::float8[], $7::text[], $8::text[])"
                    " WITH ORDINALITY AS t(suite, classname, name, duration_s, status, message, n)",
                    job_id,
                    path,
                    [t.suite for t in cases],
                    [t.classname for t in cases],
                    [t.name for t in cases],
                    [float(t.duration_s) for t in cases],
                    [t.status.value for t in cases],
                    [t.message for t in cases],
                )

        await self._tx(run)

    async def test_results(self, org: str, job_id: str) -> tuple[list[TestCase], list[str]]:
        async def run(c: PgConnection) -> tuple[list[TestCase], list[str]]:
            if await c.fetchrow("SELECT 1 FROM jobs WHERE org = $1 AND id = $2", org, job_id) is None:
                raise NotFound(f"job {job_id} not found")
            cases = [
                TestCase(
                    r["suite"],
                    r["classname"],
                    r["name"],
                    r["duration_s"],
                    TestStatus(r["status"]),
                    r["message"],
                )
                for r in await c.fetch(
                    'SELECT * FROM test_cases WHERE job_id = $1 ORDER BY path COLLATE "C", n', job_id
                )
            ]
            rejected = [
                r["path"]
                for r in await c.fetch(
                    "SELECT path FROM test_reports WHERE job_id = $1 AND error <> ''"
                    ' ORDER BY path COLLATE "C"',
                    job_id,
                )
            ]
            return cases, rejected

        return await self._snapshot(run)
