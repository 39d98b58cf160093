"""Jobs, their logs, test results, blobs, secrets and pool policies in the
SQLite store: mixed into SqliteStore, which provides the connection thread."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime

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
from testhide.controlplane.store.sqlite_common import (
    SqliteParts,
    _dt,
    _fetch_from_json,
    _fetch_to_json,
    _isolation_from_json,
    _isolation_to_json,
    _spec_from_json,
    _spec_to_json,
    _ts,
)

_TAKEN_BACK = (JobStatus.QUEUED.value, JobStatus.LOST.value)


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

    async def create_job(self, job: Job, data_key_wrapped: bytes) -> None:
        def run(c: sqlite3.Connection) -> None:
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
            self._add_transition(c, job.id, job.status, job.created_at, "")

        await self._tx(run)

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
        current, status = JobStatus(row["status"]), report.status
        replay = current.terminal or current == status
        if replay or (status == JobStatus.RUNNING and current != JobStatus.ASSIGNED):
            return self._job(c, row, with_transitions=False), False
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
        stored seq. ``entries`` are (stream, sealed data, plaintext length)."""

        def run(c: sqlite3.Connection) -> int:
            row = self._held_row(c, org, job_id, agent_id, epoch)
            last_seq, offset = row["last_seq"], row["log_size"]
            if seq <= last_seq:
                return int(last_seq)  # a replay of a batch already stored
            if JobStatus(row["status"]) not in (JobStatus.ASSIGNED, JobStatus.RUNNING):
                raise NotHeld(job_id)  # it has ended: nothing more is taken
            if seq != last_seq + 1:
                raise FailedPrecondition(
                    f"log batch {seq} of job {job_id} arrived before batch {last_seq + 1}"
                )
            for index, (stream, sealed, length) in enumerate(entries):
                c.execute(
                    "INSERT INTO log_entries VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, seq, index, offset, int(stream), sealed),
                )
                offset += length
            c.execute("UPDATE jobs SET last_seq = ?, log_size = ? WHERE id = ?", (seq, offset, job_id))
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

    # pool policy -----------------------------------------------------------------
    async def pool_policy(self, org: str, pool: str) -> PoolPolicy:
        rows = await self._query(
            "SELECT allowed_images, pull_policy, runtime, paused, egress_allow FROM pools"
            " WHERE org = ? AND name = ?",
            (org, pool),
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

    # blobs: workspaces, artifacts, reports ----------------------------------------
    async def create_blob(
        self, blob_id: str, org: str, kind: str, job_id: str | None, path: str, data_key: bytes, now: datetime
    ) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO blobs (id, org, kind, job_id, path, data_key, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (blob_id, org, kind, job_id, path, data_key, _ts(now)),
            )
        )

    async def add_blob_chunk(self, blob_id: str, index: int, sealed: bytes) -> None:
        await self._tx(
            lambda c: c.execute("INSERT INTO blob_chunks VALUES (?, ?, ?)", (blob_id, index, sealed))
        )

    async def complete_blob(self, blob_id: str, size: int, sha256: str) -> None:
        """Mark complete; a complete blob of the same job, kind and path is replaced."""

        def run(c: sqlite3.Connection) -> None:
            row = c.execute("SELECT job_id, kind, path FROM blobs WHERE id = ?", (blob_id,)).fetchone()
            if row["job_id"] is not None:
                for old in c.execute(
                    "SELECT id FROM blobs WHERE job_id = ? AND kind = ? AND path = ? AND id != ?",
                    (row["job_id"], row["kind"], row["path"], blob_id),
                ).fetchall():
                    c.execute("DELETE FROM blob_chunks WHERE blob_id = ?", (old["id"],))
                    c.execute("DELETE FROM blobs WHERE id = ?", (old["id"],))
            c.execute(
                "UPDATE blobs SET size = ?, sha256 = ?, complete = 1 WHERE id = ?", (size, sha256, blob_id)
            )

        await self._tx(run)

    async def delete_blob(self, blob_id: str) -> None:
        def run(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM blob_chunks WHERE blob_id = ?", (blob_id,))
            c.execute("DELETE FROM blobs WHERE id = ?", (blob_id,))

        await self._tx(run)

    @staticmethod
    def _blob(r: sqlite3.Row) -> BlobInfo:
        return BlobInfo(r["id"], r["org"], r["kind"], r["job_id"], r["path"], r["size"], r["sha256"])

    async def get_blob(self, org: str, blob_id: str) -> tuple[BlobInfo, bytes] | None:
        rows = await self._query(
            "SELECT * FROM blobs WHERE org = ? AND id = ? AND complete = 1", (org, blob_id)
        )
        return (self._blob(rows[0]), bytes(rows[0]["data_key"])) if rows else None

    async def find_blob(self, org: str, job_id: str, kind: str, path: str) -> tuple[BlobInfo, bytes] | None:
        rows = await self._query(
            "SELECT * FROM blobs WHERE org = ? AND job_id = ? AND kind = ? AND path = ? AND complete = 1",
            (org, job_id, kind, path),
        )
        return (self._blob(rows[0]), bytes(rows[0]["data_key"])) if rows else None

    async def list_blobs(self, org: str, job_id: str, kind: str) -> list[BlobInfo]:
        rows = await self._query(
            "SELECT * FROM blobs WHERE org = ? AND job_id = ? AND kind = ? AND complete = 1 ORDER BY path",
            (org, job_id, kind),
        )
        return [self._blob(r) for r in rows]

    async def blob_chunk(self, blob_id: str, index: int) -> bytes | None:
        rows = await self._query(
            "SELECT data FROM blob_chunks WHERE blob_id = ? AND idx = ?", (blob_id, index)
        )
        return bytes(rows[0]["data"]) if rows else None

    # secrets ---------------------------------------------------------------------
    async def put_secret(self, org: str, name: str, data_key: bytes, sealed: bytes, now: datetime) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO secrets (org, name, data_key, value, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (org, name) DO UPDATE SET"
                " data_key = excluded.data_key, value = excluded.value, updated_at = excluded.updated_at",
                (org, name, data_key, sealed, _ts(now)),
            )
        )

    async def list_secrets(self, org: str) -> list[SecretInfo]:
        rows = await self._query(
            "SELECT name, updated_at, last_used_at, last_used_by_job FROM secrets WHERE org = ?"
            " ORDER BY name",
            (org,),
        )
        return [SecretInfo(r[0], _dt(r[1]) or datetime.min, _dt(r[2]), r[3]) for r in rows]

    async def record_secret_use(self, org: str, names: tuple[str, ...], job_id: str, now: datetime) -> None:
        marks = ", ".join("?" * len(names))
        # Only "?" placeholders are interpolated: the names travel as parameters.
        sql = f"UPDATE secrets SET last_used_at = ?, last_used_by_job = ? WHERE org = ? AND name IN ({marks})"  # noqa: S608
        await self._tx(lambda c: c.execute(sql, (_ts(now), job_id, org, *names)))

    async def delete_secret(self, org: str, name: str) -> datetime | None:
        def run(c: sqlite3.Connection) -> datetime | None:
            row = c.execute(
                "SELECT updated_at FROM secrets WHERE org = ? AND name = ?", (org, name)
            ).fetchone()
            c.execute("DELETE FROM secrets WHERE org = ? AND name = ?", (org, name))
            return _dt(row["updated_at"]) if row else None

        return await self._tx(run)

    async def get_secrets(self, org: str, names: tuple[str, ...]) -> dict[str, tuple[bytes, bytes]]:
        if not names:
            return {}
        marks = ", ".join("?" * len(names))
        rows = await self._query(
            # Only "?" placeholders are interpolated: the names travel as parameters.
            f"SELECT name, data_key, value FROM secrets WHERE org = ? AND name IN ({marks})",  # noqa: S608
            (org, *names),
        )
        return {r["name"]: (bytes(r["data_key"]), bytes(r["value"])) for r in rows}

    # test results ----------------------------------------------------------------
    async def record_test_report(self, job_id: str, path: str, cases: list[TestCase], error: str) -> None:
        def run(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM test_cases WHERE job_id = ? AND path = ?", (job_id, path))
            c.execute(
                "INSERT INTO test_reports VALUES (?, ?, ?) ON CONFLICT (job_id, path) DO UPDATE SET"
                " error = excluded.error",
                (job_id, path, error),
            )
            c.executemany(
                "INSERT INTO test_cases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (job_id, path, n, t.suite, t.classname, t.name, t.duration_s, t.status.value, t.message)
                    for n, t in enumerate(cases)
                ],
            )

        await self._tx(run)

    async def test_results(self, org: str, job_id: str) -> tuple[list[TestCase], list[str]]:
        def run(c: sqlite3.Connection) -> tuple[list[TestCase], list[str]]:
            if c.execute("SELECT 1 FROM jobs WHERE org = ? AND id = ?", (org, job_id)).fetchone() is None:
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
                for r in c.execute("SELECT * FROM test_cases WHERE job_id = ? ORDER BY path, n", (job_id,))
            ]
            rejected = [
                r["path"]
                for r in c.execute(
                    "SELECT path FROM test_reports WHERE job_id = ? AND error != '' ORDER BY path", (job_id,)
                )
            ]
            return cases, rejected

        return await self._tx(run, write=False)
