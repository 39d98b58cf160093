"""Jobs (their lifecycle, holders and reports) and pool policies in the SQLite store:
mixed into SqliteStore, which provides the connection thread. Logs are in
sqlite_job_logs.py; blobs, secrets and test results in sqlite_job_files.py."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

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
from testhide.controlplane.store.sqlite_common import (
    SqliteParts,
    _dt,
    _fetch_from_json,
    _fetch_to_json,
    _isolation_from_json,
    _isolation_to_json,
    _services_isolation_from_json,
    _services_isolation_to_json,
    _spec_from_json,
    _spec_to_json,
    _ts,
)

_TAKEN_BACK = (JobStatus.QUEUED.value, JobStatus.LOST.value)
_POOL_POLICY_SQL = (
    "SELECT allowed_images, pull_policy, runtime, paused, egress_allow FROM pools WHERE org = ? AND name = ?"
)


def _pool_policy(r: sqlite3.Row) -> PoolPolicy:
    return PoolPolicy(
        tuple(json.loads(r["allowed_images"])),
        PullPolicy(r["pull_policy"]),
        r["runtime"],
        bool(r["paused"]),
        tuple(json.loads(r["egress_allow"])),
    )


def _filter_sql(where: JobFilter) -> tuple[str, list[object]]:
    """``where`` as SQL conditions (each starting " AND ") and their arguments: only
    placeholders reach the SQL text. Labels live in the spec's JSON; json_each
    reads them as keys and values, so a key needs no quoting into a JSON path.
    Times are stored as UTC ISO 8601 text, which sorts as the times do."""
    conditions: list[str] = []
    args: list[object] = []
    if where.statuses:
        conditions.append("status IN (SELECT value FROM json_each(?))")
        args.append(json.dumps(sorted(s.value for s in where.statuses)))
    for key, value in where.labels:
        conditions.append(
            "EXISTS (SELECT 1 FROM json_each(jobs.spec, '$.labels') WHERE key = ? AND value = ?)"
        )
        args += [key, value]
    if where.pool:
        conditions.append("pool = ?")
        args.append(where.pool)
    if where.since is not None:
        conditions.append("created_at >= ?")
        args.append(_ts(where.since.astimezone(UTC)))
    return "".join(f" AND {c}" for c in conditions), args


class SqliteJobData(SqliteParts):
    # jobs ----------------------------------------------------------------------
    @staticmethod
    def _job(c: sqlite3.Connection, r: sqlite3.Row, with_transitions: bool = True) -> Job:
        transitions = (
            tuple(
                Transition(JobStatus(t["status"]), _dt(t["at"]) or datetime.min, t["reason"])
                for t in c.execute("SELECT * FROM job_transitions WHERE job_id = ? ORDER BY n", (r["id"],))
            )
            if with_transitions
            else ()
        )
        return Job(
            id=r["id"],
            org=r["org"],
            spec=_spec_from_json(r["spec"]),
            status=JobStatus(r["status"]),
            created_at=_dt(r["created_at"]) or datetime.min,
            exit_code=r["exit_code"],
            status_reason=r["status_reason"],
            started_at=_dt(r["started_at"]),
            finished_at=_dt(r["finished_at"]),
            agent_id=r["agent_id"],
            epoch=r["epoch"],
            log_size=r["log_size"],
            last_seq=r["last_seq"],
            transitions=transitions,
            attempt=r["attempt"],
            retry_of=r["retry_of"],
            retried_as=r["retried_as"],
            lease_expires_at=_dt(r["lease_expires_at"]),
            isolation=_isolation_from_json(r["isolation"]),
            fetch=_fetch_from_json(r["fetch_step"]),
            service_isolation=_services_isolation_from_json(r["service_isolation"]),
            log_chain_head=stored_log_chain_head(r["id"], r["last_seq"], r["log_chain"]),
            agent_log_chain_head=bytes(r["agent_log_chain"] or b""),
        )

    @staticmethod
    def _add_transition(
        c: sqlite3.Connection, job_id: str, status: JobStatus, now: datetime, reason: str
    ) -> None:
        c.execute(
            "INSERT INTO job_transitions SELECT ?, COALESCE(MAX(n), 0) + 1, ?, ?, ? FROM job_transitions"
            " WHERE job_id = ?",
            (job_id, status.value, _ts(now), reason, job_id),
        )

    @staticmethod
    def _insert_job(c: sqlite3.Connection, job: Job, data_key_wrapped: bytes) -> None:
        c.execute(
            "INSERT INTO jobs"
            " (id, org, pool, spec, status, created_at, data_key, attempt, retry_of, retries)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.org,
                job.spec.pool,
                _spec_to_json(job.spec),
                job.status.value,
                _ts(job.created_at),
                data_key_wrapped,
                job.attempt,
                job.retry_of,
                job.spec.retries,
            ),
        )
        # Its first transition: a new id has none yet (a reused one fails on the insert above).
        c.execute(
            "INSERT INTO job_transitions (job_id, n, status, at, reason) VALUES (?, 1, ?, ?, '')",
            (job.id, job.status.value, _ts(job.created_at)),
        )

    async def create_job(self, job: Job, data_key_wrapped: bytes) -> None:
        await self._tx(lambda c: self._insert_job(c, job, data_key_wrapped))

    async def create_jobs(
        self, jobs: Sequence[tuple[Job, bytes]], admit: Callable[[Job, PoolPolicy], None]
    ) -> list[PoolPolicy | ControlPlaneError]:
        def run(c: sqlite3.Connection) -> list[PoolPolicy | ControlPlaneError]:
            policies: dict[tuple[str, str], PoolPolicy | None] = {}
            outcomes: list[PoolPolicy | ControlPlaneError] = []
            for job, data_key_wrapped in jobs:
                pool = (job.org, job.spec.pool)
                if pool not in policies:
                    row = c.execute(_POOL_POLICY_SQL, pool).fetchone()
                    policies[pool] = _pool_policy(row) if row else None
                try:
                    policy = policies[pool]
                    if policy is None:
                        raise NotFound(f"pool {job.org}/{job.spec.pool} not found")
                    admit(job, policy)
                except ControlPlaneError as exc:  # refused before anything of it was written
                    outcomes.append(exc)
                    continue
                self._insert_job(c, job, data_key_wrapped)
                outcomes.append(policy)
            return outcomes

        return await self._tx(run)

    async def get_job(self, org: str, job_id: str) -> Job | None:
        def run(c: sqlite3.Connection) -> Job | None:
            row = c.execute("SELECT * FROM jobs WHERE org = ? AND id = ?", (org, job_id)).fetchone()
            return self._job(c, row) if row else None

        return await self._tx(run, write=False)

    async def get_job_data_key(self, org: str, job_id: str) -> bytes:
        rows = await self._query("SELECT data_key FROM jobs WHERE org = ? AND id = ?", (org, job_id))
        if not rows:
            raise NotFound(f"job {job_id} not found")
        return bytes(rows[0]["data_key"])

    async def list_jobs(
        self, org: str, limit: int, before_id: str | None, where: JobFilter | None = None
    ) -> list[Job]:
        conditions, args = _filter_sql(where or JobFilter())

        def run(c: sqlite3.Connection) -> list[Job]:
            rows = c.execute(
                f"SELECT * FROM jobs WHERE org = ? AND id < ?{conditions} ORDER BY id DESC LIMIT ?",  # noqa: S608
                (org, before_id or "\U0010ffff", *args, limit),
            ).fetchall()
            return [self._job(c, r) for r in rows]

        return await self._tx(run, write=False)

    async def queued_jobs(self, org: str, pool: str, limit: int) -> list[Job]:
        def run(c: sqlite3.Connection) -> list[Job]:
            rows = c.execute(
                "SELECT * FROM jobs WHERE org = ? AND pool = ? AND status = ?"
                # a paused pool's queued jobs wait: the dispatcher does not see them
                " AND NOT EXISTS (SELECT 1 FROM pools p WHERE p.org = jobs.org AND p.name = jobs.pool"
                " AND p.paused <> 0) ORDER BY id LIMIT ?",
                (org, pool, JobStatus.QUEUED.value, limit),
            ).fetchall()
            return [self._job(c, r, with_transitions=False) for r in rows]  # the dispatcher's hot path

        return await self._tx(run, write=False)

    async def queued_pools(self) -> list[tuple[str, str]]:
        rows = await self._query(
            "SELECT DISTINCT org, pool FROM jobs WHERE status = ?"
            " AND NOT EXISTS (SELECT 1 FROM pools p WHERE p.org = jobs.org AND p.name = jobs.pool"
            " AND p.paused <> 0)",
            (JobStatus.QUEUED.value,),
        )
        return [(r["org"], r["pool"]) for r in rows]

    async def jobs_of_agent(self, org: str, agent_id: str) -> list[Job]:
        def run(c: sqlite3.Connection) -> list[Job]:
            rows = c.execute(
                "SELECT * FROM jobs WHERE org = ? AND agent_id = ? AND status IN (?, ?) ORDER BY id",
                (org, agent_id, JobStatus.ASSIGNED.value, JobStatus.RUNNING.value),
            ).fetchall()
            return [self._job(c, r) for r in rows]

        return await self._tx(run, write=False)

    async def assign_job(
        self, org: str, job_id: str, agent_id: str, now: datetime, lease_until: datetime
    ) -> Job | None:
        """QUEUED -> ASSIGNED with a new fencing epoch and a lease, or None if someone else won."""

        def run(c: sqlite3.Connection) -> Job | None:
            return self._assign(c, org, job_id, agent_id, now, lease_until)

        return await self._tx(run)

    async def assign_jobs(
        self, org: str, pairs: Sequence[tuple[str, str]], now: datetime, lease_until: datetime
    ) -> list[Job | None]:
        def run(c: sqlite3.Connection) -> list[Job | None]:
            return [self._assign(c, org, j, a, now, lease_until, with_transitions=False) for j, a in pairs]

        return await self._tx(run)

    def _assign(
        self,
        c: sqlite3.Connection,
        org: str,
        job_id: str,
        agent_id: str,
        now: datetime,
        lease_until: datetime,
        with_transitions: bool = True,
    ) -> Job | None:
        cur = c.execute(
            "UPDATE jobs SET status = ?, agent_id = ?, epoch = epoch + 1, lease_expires_at = ?"
            " WHERE org = ? AND id = ? AND status = ?",
            (JobStatus.ASSIGNED.value, agent_id, _ts(lease_until), org, job_id, JobStatus.QUEUED.value),
        )
        if cur.rowcount != 1:
            return None
        self._add_transition(c, job_id, JobStatus.ASSIGNED, now, f"agent {agent_id}")
        row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(c, row, with_transitions)

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
        def run(c: sqlite3.Connection) -> Job:
            row = c.execute("SELECT * FROM jobs WHERE org = ? AND id = ?", (org, job_id)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            if epoch is not None and row["epoch"] != epoch:
                raise StaleEpoch(f"job {job_id} is no longer at epoch {epoch}")
            current = JobStatus(row["status"])
            if current == status:
                return self._job(c, row)
            if current.terminal:
                raise FailedPrecondition(f"job {job_id} has already ended ({current.value})")
            return self._apply_status(c, row, status, now, reason, exit_code)

        return await self._tx(run)

    def _apply_status(
        self,
        c: sqlite3.Connection,
        row: sqlite3.Row,
        status: JobStatus,
        now: datetime,
        reason: str,
        exit_code: int | None,
        with_transitions: bool = True,
    ) -> Job:
        """Move the job in ``row`` to ``status``, with its timestamps and a transition."""
        started = _ts(now) if status == JobStatus.RUNNING else row["started_at"]
        finished = _ts(now) if status.terminal else None
        lease = None if status.terminal or status == JobStatus.QUEUED else row["lease_expires_at"]
        c.execute(
            "UPDATE jobs SET status = ?, status_reason = ?, exit_code = ?, started_at = ?, finished_at = ?,"
            " lease_expires_at = ? WHERE id = ?",
            (status.value, reason, exit_code, started, finished, lease, row["id"]),
        )
        self._add_transition(c, row["id"], status, now, reason)
        return self._job(
            c, c.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone(), with_transitions
        )

    @staticmethod
    def _held_row(c: sqlite3.Connection, org: str, job_id: str, agent_id: str, epoch: int) -> sqlite3.Row:
        """The job's row if ``agent_id`` holds it at ``epoch``, else NotHeld: the one
        test every agent message about a job passes, inside the transaction that
        acts on it. Assigned to the agent at that epoch, and not taken back since
        (QUEUED again, or LOST: both move the epoch on and hold for nobody, not
        even at the epoch that follows the agent's own). A job that ended on its
        holder's report, or was canceled under it, stays its holder's, so
        replays of that report are answered."""
        row: sqlite3.Row | None = c.execute(
            "SELECT * FROM jobs"
            " WHERE org = ? AND id = ? AND agent_id = ? AND epoch = ? AND status NOT IN (?, ?)",
            (org, job_id, agent_id, epoch, *_TAKEN_BACK),
        ).fetchone()
        if row is None:
            raise NotHeld(job_id)
        return row

    async def held_job(self, org: str, job_id: str, agent_id: str, epoch: int) -> Job:
        def run(c: sqlite3.Connection) -> Job:
            return self._job(c, self._held_row(c, org, job_id, agent_id, epoch), with_transitions=False)

        return await self._tx(run, write=False)

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

        def run(c: sqlite3.Connection) -> tuple[Job, bool]:
            return self._report(c, report, now)

        result: tuple[Job, bool] = await self._tx(run)
        return result

    async def report_jobs(
        self, reports: Sequence[JobReport], now: datetime
    ) -> list[tuple[Job, bool] | ControlPlaneError]:
        def run(c: sqlite3.Connection) -> list[tuple[Job, bool] | ControlPlaneError]:
            outcomes: list[tuple[Job, bool] | ControlPlaneError] = []
            for report in reports:
                try:
                    outcomes.append(self._report(c, report, now))
                except (NotHeld, FailedPrecondition) as exc:  # raised before it wrote anything
                    outcomes.append(exc)
            return outcomes

        return await self._tx(run)

    def _report(self, c: sqlite3.Connection, report: JobReport, now: datetime) -> tuple[Job, bool]:
        """One holder's report, checked in full before anything is written."""
        row = self._held_row(c, report.org, report.job_id, report.agent_id, report.epoch)
        if report.last_seq is not None and row["last_seq"] != report.last_seq:
            raise FailedPrecondition(
                f"result of job {report.job_id} arrived before its log ({row['last_seq']}/{report.last_seq})"
            )
        if report.isolation is not None:
            c.execute(
                "UPDATE jobs SET isolation = ? WHERE id = ?",
                (_isolation_to_json(report.isolation), row["id"]),
            )
        if report.services:
            c.execute(
                "UPDATE jobs SET service_isolation = ? WHERE id = ?",
                (_services_isolation_to_json(report.services), row["id"]),
            )
        current, status = JobStatus(row["status"]), report.status
        replay = current.terminal or current == status
        if replay or (status == JobStatus.RUNNING and current != JobStatus.ASSIGNED):
            return self._job(c, row, with_transitions=False), False
        if report.log_chain_head:
            c.execute("UPDATE jobs SET agent_log_chain = ? WHERE id = ?", (report.log_chain_head, row["id"]))
        job = self._apply_status(c, row, status, now, report.reason, report.exit_code, with_transitions=False)
        return job, True

    async def record_isolation(
        self, org: str, job_id: str, agent_id: str, epoch: int, isolation: Isolation
    ) -> None:
        def run(c: sqlite3.Connection) -> None:
            self._held_row(c, org, job_id, agent_id, epoch)
            c.execute("UPDATE jobs SET isolation = ? WHERE id = ?", (_isolation_to_json(isolation), job_id))

        await self._tx(run)

    async def record_fetch(self, org: str, job_id: str, agent_id: str, epoch: int, fetch: FetchStep) -> None:
        def run(c: sqlite3.Connection) -> None:
            self._held_row(c, org, job_id, agent_id, epoch)
            c.execute("UPDATE jobs SET fetch_step = ? WHERE id = ?", (_fetch_to_json(fetch), job_id))

        await self._tx(run)

    # pool policy -----------------------------------------------------------------
    async def pool_policy(self, org: str, pool: str) -> PoolPolicy:
        rows = await self._query(_POOL_POLICY_SQL, (org, pool))
        if not rows:
            raise NotFound(f"pool {org}/{pool} not found")
        return _pool_policy(rows[0])

    async def set_pool_policy(self, org: str, pool: str, policy: PoolPolicy) -> None:
        def run(c: sqlite3.Connection) -> None:
            if (
                c.execute(
                    "UPDATE pools SET allowed_images = ?, pull_policy = ?, runtime = ?, egress_allow = ?"
                    " WHERE org = ? AND name = ?",
                    (
                        json.dumps(list(policy.allowed_images)),
                        policy.pull_policy.value,
                        policy.runtime,
                        json.dumps(list(policy.egress_allow)),
                        org,
                        pool,
                    ),
                ).rowcount
                != 1
            ):
                raise NotFound(f"pool {org}/{pool} not found")

        await self._tx(run)
