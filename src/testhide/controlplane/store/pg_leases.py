"""Job leases in the PostgreSQL store: extended by the holding agent's heartbeats,
expired by the control plane's sweep, and LOST jobs retried as new jobs.

Releasing a job (lease lapsed, agent came back without it) bumps its fencing
epoch at once, so anything the old holder still sends is refused; a job queued
again belongs to no agent until it is assigned anew.

Several control planes sweep the same database, and READ COMMITTED gives no
single writer to lean on as SQLite does: every read that decides a write locks
its rows (``FOR UPDATE``, the sweep ``SKIP LOCKED``, leaving a job another
replica is already releasing to it) or the write is conditional on what was
read, so a job is released once and retried once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from testhide.controlplane.errors import NotFound, StaleEpoch
from testhide.controlplane.jobs.model import Job, JobStatus
from testhide.controlplane.store.base import released_as
from testhide.controlplane.store.pg_common import PgConnection, PgParts, Row

_HELD = (JobStatus.ASSIGNED.value, JobStatus.RUNNING.value)


class PgLeases(PgParts):
    """Mixed into PgStore, which provides the transaction runner; PgJobData the row mapping."""

    _job: Callable[[PgConnection, Row], Awaitable[Job]]
    _jobs: Callable[[PgConnection, Sequence[Row]], Awaitable[list[Job]]]
    _add_transition: Callable[[PgConnection, str, JobStatus, datetime, str], Awaitable[None]]

    async def extend_leases(self, org: str, agent_id: str, held: dict[str, int], until: datetime) -> int:
        """Extend the leases of the jobs the agent says it holds, at those epochs;
        the others in ``held`` are passed over, whoever holds them. One statement
        for the whole heartbeat: the held test (``_held_row``: the agent's, at that
        epoch, not taken back) narrowed to the live jobs, checked again on each row
        as it is written, so a job the sweep releases meanwhile is not extended."""
        if not held:
            return 0
        ids, epochs = list(held), list(held.values())

        async def run(c: PgConnection) -> int:
            return await c.execute(
                "UPDATE jobs SET lease_expires_at = $1 FROM unnest($2::text[], $3::bigint[]) AS h(id, epoch)"
                " WHERE jobs.org = $4 AND jobs.agent_id = $5 AND jobs.id = h.id AND jobs.epoch = h.epoch"
                " AND jobs.status IN ($6, $7)",
                until,
                ids,
                epochs,
                org,
                agent_id,
                *_HELD,
            )

        return await self._tx(run)

    async def extend_all_leases(self, until: datetime) -> int:
        """At start-up: every agent gets a whole lease to reconnect, however long we were down."""
        return await self._tx(
            lambda c: c.execute(
                "UPDATE jobs SET lease_expires_at = $1 WHERE status IN ($2, $3)", until, *_HELD
            )
        )

    async def _release(self, c: PgConnection, row: Row, status: JobStatus, reason: str, now: datetime) -> Job:
        """``row`` must be locked (or its update conditional) by the caller."""
        status, reason = released_as(status, reason, row["last_seq"])
        finished = now if status.terminal else None
        # Queued again, it is no agent's: its former holder must not pass for it at the next epoch.
        holder = "" if status == JobStatus.QUEUED else row["agent_id"]
        released = await c.fetchrow(
            "UPDATE jobs SET status = $1, status_reason = $2, epoch = epoch + 1, lease_expires_at = NULL,"
            " finished_at = $3, agent_id = $4 WHERE id = $5 RETURNING *",
            status.value,
            reason,
            finished,
            holder,
            row["id"],
        )
        assert released is not None
        await self._add_transition(c, row["id"], status, now, reason)
        return await self._job(c, released)

    async def release_job(
        self, org: str, job_id: str, epoch: int, status: JobStatus, reason: str, now: datetime
    ) -> Job:
        """Take a held job back from its agent: QUEUED again (it had not started) or LOST
        (``released_as``: a job whose log began is LOST too)."""

        async def run(c: PgConnection) -> Job:
            row = await c.fetchrow("SELECT * FROM jobs WHERE org = $1 AND id = $2 FOR UPDATE", org, job_id)
            if row is None:
                raise NotFound(f"job {job_id} not found")
            if row["epoch"] != epoch or row["status"] not in _HELD:
                raise StaleEpoch(f"job {job_id} is no longer held at epoch {epoch}")
            return await self._release(c, row, status, reason, now)

        return await self._tx(run)

    async def expire_leases(self, now: datetime) -> list[tuple[Job, str]]:
        """Lapsed leases: an ASSIGNED job goes back to the queue (unless its log began), a RUNNING
        one is LOST.
        Returns each released job with the agent that held it. A row another
        transaction has locked (a heartbeat, a report, another replica's sweep)
        is skipped, for the next sweep to look at again; one locked here is
        checked again at its latest version, so none is released twice."""

        async def run(c: PgConnection) -> list[tuple[Job, str]]:
            rows = await c.fetch(
                "SELECT * FROM jobs WHERE status IN ($1, $2) AND lease_expires_at < $3"
                " ORDER BY id FOR UPDATE SKIP LOCKED",
                *_HELD,
                now,
            )
            released = []
            for row in rows:
                lapsed = f"lease of agent {row['agent_id']} lapsed at {row['lease_expires_at'].isoformat()}"
                if row["status"] == JobStatus.ASSIGNED.value:
                    job = await self._release(
                        c, row, JobStatus.QUEUED, f"{lapsed} before it started; requeued", now
                    )
                else:
                    job = await self._release(
                        c, row, JobStatus.LOST, f"{lapsed}: the agent stopped reporting", now
                    )
                released.append((job, str(row["agent_id"])))
            return released

        return await self._tx(run)

    async def retryable_jobs(self, limit: int) -> list[Job]:
        """LOST jobs that asked for another attempt and have none yet. Another
        replica may retry one first: ``create_retry`` decides."""

        async def run(c: PgConnection) -> list[Job]:
            rows = await c.fetch(
                "SELECT * FROM jobs WHERE status = $1 AND retried_as = '' AND attempt <= retries"
                " ORDER BY id LIMIT $2",
                JobStatus.LOST.value,
                limit,
            )
            return await self._jobs(c, rows)

        return await self._read(run)

    async def create_retry(self, lost: Job, retry: Job, data_key_wrapped: bytes) -> Job | None:
        """Queue ``retry`` as the next attempt of ``lost``, once: None if another did it first
        (the conditional update waits for a concurrent one and sees its ``retried_as``)."""

        async def run(c: PgConnection) -> Job | None:
            if (
                await c.execute(
                    "UPDATE jobs SET retried_as = $1"
                    " WHERE org = $2 AND id = $3 AND status = $4 AND retried_as = ''",
                    retry.id,
                    lost.org,
                    lost.id,
                    JobStatus.LOST.value,
                )
                != 1
            ):
                return None
            row = await c.fetchrow(
                "INSERT INTO jobs"
                " (id, org, pool, spec, status, created_at, data_key, attempt, retry_of, retries)"
                " SELECT $1, org, pool, spec, $2, $3, $4, attempt + 1, id, retries FROM jobs WHERE id = $5"
                " RETURNING *",
                retry.id,
                JobStatus.QUEUED.value,
                retry.created_at,
                data_key_wrapped,
                lost.id,
            )
            assert row is not None
            await self._add_transition(c, retry.id, JobStatus.QUEUED, retry.created_at, f"retry of {lost.id}")
            return await self._job(c, row)

        return await self._tx(run)
