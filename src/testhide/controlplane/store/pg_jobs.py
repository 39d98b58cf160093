"""Jobs (their lifecycle, holders and reports) and pool policies in the PostgreSQL
store: mixed into PgStore, which provides the connection pool. Logs are in
pg_job_logs.py; blobs, secrets and test results in pg_job_files.py.

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
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from testhide.controlplane.errors import ControlPlaneError, FailedPrecondition, NotFound, NotHeld, StaleEpoch
from testhide.controlplane.jobs.model import (
    FetchStep,
    Isolation,
    Job,
    JobFilter,
    JobReport,
    JobStatus,
    PoolPolicy,
    PullPolicy,
    Transition,
)
from testhide.controlplane.store.base import (
    stored_log_chain_head,
)
from testhide.controlplane.store.pg_common import (
    PgConnection,
    PgParts,
    Row,
    fetch_from_json,
    fetch_to_json,
    isolation_from_json,
    isolation_to_json,
    services_isolation_from_json,
    services_isolation_to_json,
    spec_from_json,
    spec_to_json,
)

T = TypeVar("T")

_TAKEN_BACK = (JobStatus.QUEUED.value, JobStatus.LOST.value)
_POOL_POLICY_SQL = (
    "SELECT allowed_images, pull_policy, runtime, paused, egress_allow FROM pools"
    " WHERE org = $1 AND name = $2"
)
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
        service_isolation=services_isolation_from_json(r["service_isolation"]),
        log_chain_head=stored_log_chain_head(r["id"], r["last_seq"], r["log_chain"]),
        agent_log_chain_head=bytes(r["agent_log_chain"] or b""),
    )


def _transition(t: Row) -> Transition:
    return Transition(JobStatus(t["status"]), t["at"], t["reason"])


def _pool_policy(r: Row) -> PoolPolicy:
    return PoolPolicy(
        tuple(json.loads(r["allowed_images"])),
        PullPolicy(r["pull_policy"]),
        r["runtime"],
        bool(r["paused"]),
        tuple(json.loads(r["egress_allow"])),
    )


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

    @staticmethod
    async def _insert_job(c: PgConnection, job: Job, data_key_wrapped: bytes) -> None:
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
        # Its first transition: a new id has none yet (a reused one fails on the insert above).
        await c.execute(
            "INSERT INTO job_transitions (job_id, n, status, at, reason) VALUES ($1, 1, $2, $3, '')",
            job.id,
            job.status.value,
            job.created_at,
        )

    async def create_job(self, job: Job, data_key_wrapped: bytes) -> None:
        await self._tx(lambda c: self._insert_job(c, job, data_key_wrapped))

    async def create_jobs(
        self, jobs: Sequence[tuple[Job, bytes]], admit: Callable[[Job, PoolPolicy], None]
    ) -> list[PoolPolicy | ControlPlaneError]:
        async def run(c: PgConnection) -> list[PoolPolicy | ControlPlaneError]:
            policies: dict[tuple[str, str], PoolPolicy | None] = {}
            outcomes: list[PoolPolicy | ControlPlaneError] = []
            for job, data_key_wrapped in jobs:
                pool = (job.org, job.spec.pool)
                if pool not in policies:
                    row = await c.fetchrow(_POOL_POLICY_SQL, *pool)
                    policies[pool] = _pool_policy(row) if row else None
                try:
                    policy = policies[pool]
                    if policy is None:
                        raise NotFound(f"pool {job.org}/{job.spec.pool} not found")
                    admit(job, policy)
                except ControlPlaneError as exc:  # refused before anything of it was written
                    outcomes.append(exc)
                    continue
                await self._insert_job(c, job, data_key_wrapped)
                outcomes.append(policy)
            return outcomes

        return await self._tx(run)

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
        if report.services:
            await c.execute(
                "UPDATE jobs SET service_isolation = $1 WHERE id = $2",
                services_isolation_to_json(report.services),
                row["id"],
            )
        current, status = JobStatus(row["status"]), report.status
        replay = current.terminal or current == status
        if replay or (status == JobStatus.RUNNING and current != JobStatus.ASSIGNED):
            return _job_of(row), False
        if report.log_chain_head:
            await c.execute(
                "UPDATE jobs SET agent_log_chain = $1 WHERE id = $2", report.log_chain_head, row["id"]
            )
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

    # pool policy -----------------------------------------------------------------
    async def pool_policy(self, org: str, pool: str) -> PoolPolicy:
        rows = await self._fetch(_POOL_POLICY_SQL, org, pool)
        if not rows:
            raise NotFound(f"pool {org}/{pool} not found")
        return _pool_policy(rows[0])

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
