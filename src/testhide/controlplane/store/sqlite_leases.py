"""Job leases in the SQLite store: extended by the holding agent's heartbeats,
expired by the control plane's sweep, and LOST jobs retried as new jobs.

Releasing a job (lease lapsed, agent came back without it) bumps its fencing
epoch at once, so anything the old holder still sends is refused; a job queued
again belongs to no agent until it is assigned anew."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime

from testhide.controlplane.errors import NotFound, NotHeld, StaleEpoch
from testhide.controlplane.jobs.model import Job, JobStatus
from testhide.controlplane.store.base import released_as
from testhide.controlplane.store.sqlite_common import SqliteParts, _ts

_HELD = (JobStatus.ASSIGNED.value, JobStatus.RUNNING.value)


class SqliteLeases(SqliteParts):
    """Mixed into SqliteStore, which provides the transaction runner; SqliteJobData the row mapping."""

    _job: Callable[[sqlite3.Connection, sqlite3.Row], Job]
    _held_row: Callable[[sqlite3.Connection, str, str, str, int], sqlite3.Row]
    _add_transition: Callable[[sqlite3.Connection, str, JobStatus, datetime, str], None]

    async def extend_leases(self, org: str, agent_id: str, held: dict[str, int], until: datetime) -> int:
        """Extend the leases of the jobs the agent says it holds, at those epochs;
        the others in ``held`` are passed over, whoever holds them."""

        def run(c: sqlite3.Connection) -> int:
            extended = 0
            for job_id, epoch in held.items():
                try:
                    row = self._held_row(c, org, job_id, agent_id, epoch)
                except NotHeld:
                    continue
                if row["status"] in _HELD:
                    c.execute("UPDATE jobs SET lease_expires_at = ? WHERE id = ?", (_ts(until), row["id"]))
                    extended += 1
            return extended

        result: int = await self._tx(run)
        return result

    async def extend_all_leases(self, until: datetime) -> int:
        """At start-up: every agent gets a whole lease to reconnect, however long we were down."""

        def run(c: sqlite3.Connection) -> int:
            return int(
                c.execute(
                    "UPDATE jobs SET lease_expires_at = ? WHERE status IN (?, ?)", (_ts(until), *_HELD)
                ).rowcount
            )

        result: int = await self._tx(run)
        return result

    def _release(
        self, c: sqlite3.Connection, row: sqlite3.Row, status: JobStatus, reason: str, now: datetime
    ) -> Job:
        status, reason = released_as(status, reason, row["last_seq"])
        finished = _ts(now) if status.terminal else None
        # Queued again, it is no agent's: its former holder must not pass for it at the next epoch.
        holder = "" if status == JobStatus.QUEUED else row["agent_id"]
        c.execute(
            "UPDATE jobs SET status = ?, status_reason = ?, epoch = epoch + 1, lease_expires_at = NULL,"
            " finished_at = ?, agent_id = ? WHERE id = ?",
            (status.value, reason, finished, holder, row["id"]),
        )
        self._add_transition(c, row["id"], status, now, reason)
        return self._job(c, c.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    async def release_job(
        self, org: str, job_id: str, epoch: int, status: JobStatus, reason: str, now: datetime
    ) -> Job:
        """Take a held job back from its agent: QUEUED again (it had not started) or LOST
        (``released_as``: a job whose log began is LOST too)."""

        def run(c: sqlite3.Connection) -> Job:
            row = c.execute("SELECT * FROM jobs WHERE org = ? AND id = ?", (org, job_id)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            if row["epoch"] != epoch or row["status"] not in _HELD:
                raise StaleEpoch(f"job {job_id} is no longer held at epoch {epoch}")
            return self._release(c, row, status, reason, now)

        job: Job = await self._tx(run)
        return job

    async def expire_leases(self, now: datetime) -> list[tuple[Job, str]]:
        """Lapsed leases: an ASSIGNED job goes back to the queue (unless its log began), a RUNNING
        one is LOST.
        Returns each released job with the agent that held it."""

        def run(c: sqlite3.Connection) -> list[tuple[Job, str]]:
            rows = c.execute(
                "SELECT * FROM jobs WHERE status IN (?, ?) AND lease_expires_at < ? ORDER BY id",
                (*_HELD, _ts(now)),
            ).fetchall()
            released = []
            for row in rows:
                lapsed = f"lease of agent {row['agent_id']} lapsed at {row['lease_expires_at']}"
                if row["status"] == JobStatus.ASSIGNED.value:
                    job = self._release(
                        c, row, JobStatus.QUEUED, f"{lapsed} before it started; requeued", now
                    )
                else:
                    job = self._release(c, row, JobStatus.LOST, f"{lapsed}: the agent stopped reporting", now)
                released.append((job, str(row["agent_id"])))
            return released

        jobs: list[tuple[Job, str]] = await self._tx(run)
        return jobs

    async def retryable_jobs(self, limit: int) -> list[Job]:
        """LOST jobs that asked for another attempt and have none yet."""

        def run(c: sqlite3.Connection) -> list[Job]:
            rows = c.execute(
                "SELECT * FROM jobs WHERE status = ? AND retried_as = '' AND attempt <= retries"
                " ORDER BY id LIMIT ?",
                (JobStatus.LOST.value, limit),
            ).fetchall()
            return [self._job(c, r) for r in rows]

        jobs: list[Job] = await self._tx(run, write=False)
        return jobs

    async def create_retry(self, lost: Job, retry: Job, data_key_wrapped: bytes) -> Job | None:
        """Queue ``retry`` as the next attempt of ``lost``, once: None if another did it first."""

        def run(c: sqlite3.Connection) -> Job | None:
            if (
                c.execute(
                    "UPDATE jobs SET retried_as = ?"
                    " WHERE org = ? AND id = ? AND status = ? AND retried_as = ''",
                    (retry.id, lost.org, lost.id, JobStatus.LOST.value),
                ).rowcount
                != 1
            ):
                return None
            c.execute(
                "INSERT INTO jobs"
                " (id, org, pool, spec, status, created_at, data_key, attempt, retry_of, retries)"
                " SELECT ?, org, pool, spec, ?, ?, ?, attempt + 1, id, retries FROM jobs WHERE id = ?",
                (retry.id, JobStatus.QUEUED.value, _ts(retry.created_at), data_key_wrapped, lost.id),
            )
            self._add_transition(c, retry.id, JobStatus.QUEUED, retry.created_at, f"retry of {lost.id}")
            return self._job(c, c.execute("SELECT * FROM jobs WHERE id = ?", (retry.id,)).fetchone())

        job: Job | None = await self._tx(run)
        return job
