"""Job leases: an assignment holds for ``duration`` and the holding agent's
heartbeats extend it. When one lapses, a job that had not started is queued
again and a running one is LOST, then retried as a new job if it asked for
that. Every release moves the job's fencing epoch on, so the old holder is
refused whatever it still sends, and told to stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import structlog

from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.cluster import LEASE_SWEEP
from testhide.controlplane.errors import StaleEpoch, StorageUnavailable
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.jobs.model import Job, JobStatus, new_job_id
from testhide.controlplane.jobs.scheduler import AgentSession, Cancel, Scheduler
from testhide.controlplane.jobs.store import LeaseStore

log = structlog.get_logger("testhide.leases")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Leases:
    def __init__(
        self,
        store: LeaseStore,
        master: MasterKey,
        scheduler: Scheduler,
        logs: LogBook,
        duration: timedelta,
        clock: Clock = utc_now,
    ) -> None:
        self.duration = duration
        self._store = store
        self._master = master
        self._scheduler = scheduler
        self._logs = logs
        self._clock = clock

    @property
    def heartbeat_interval(self) -> timedelta:
        """What agents are asked to keep: three heartbeats per lease."""
        return self.duration / 3

    @property
    def sweep_interval(self) -> timedelta:
        return min(timedelta(seconds=1), self.duration / 10)

    async def extend(self, session: AgentSession, held: dict[str, int]) -> None:
        identity = session.identity
        until = self._clock() + self.duration
        extended = await self._store.extend_leases(identity.org, identity.agent_id, held, until)
        if extended < len(held):  # the others were released, or are held by someone else now
            log.debug("leases_not_extended", agent_id=identity.agent_id, held=len(held), extended=extended)

    async def release(self, job: Job, status: JobStatus, reason: str) -> Job | None:
        """Take a held job back (QUEUED or LOST); None if it had already moved on."""
        try:
            released = await self._store.release_job(
                job.org, job.id, job.epoch, status, reason, self._clock()
            )
        except StaleEpoch:
            return None
        self._released(released, previous_agent=job.agent_id)
        return released

    def _released(self, job: Job, previous_agent: str) -> None:
        session = self._scheduler.session_of(previous_agent)
        if session is not None and job.id in session.jobs:
            session.jobs.discard(job.id)
            session.send(Cancel(job.id, job.status_reason, abandon=True))
        self._logs.notify(job.id)
        if job.status == JobStatus.QUEUED:
            self._scheduler.queued(job.org, job.spec.pool)
        log.warning(
            "job_released",
            job_id=job.id,
            status=job.status.value,
            agent_id=previous_agent,
            reason=job.status_reason,
        )

    async def sweep(self) -> None:
        """Release lapsed leases, then queue the retries LOST jobs asked for."""
        expired = await self._store.expire_leases(self._clock())
        if expired:
            log.debug("leases_expired", jobs=len(expired))
        for job, holder in expired:
            self._released(job, previous_agent=holder)
        await self.retry_lost()

    async def retry_lost(self) -> list[Job]:
        retries = []
        for lost in await self._store.retryable_jobs(limit=100):
            retry_id = new_job_id()
            _, wrapped = self._master.new_data_key(aad=retry_id.encode())
            draft = Job(
                id=retry_id, org=lost.org, spec=lost.spec, status=JobStatus.QUEUED, created_at=self._clock()
            )
            retry = await self._store.create_retry(lost, draft, wrapped)
            if retry is None:
                continue
            retries.append(retry)
            self._logs.notify(lost.id)  # its followers move on to the retry
            self._scheduler.queued(retry.org, retry.spec.pool)
            log.info(
                "job_retried",
                job_id=lost.id,
                retry_job_id=retry.id,
                attempt=retry.attempt,
                of=lost.spec.retries + 1,
            )
        return retries

    async def run(self) -> None:
        """Sweeps while this replica holds the cluster's lease-sweep role (always,
        on its own): exactly one replica releases and retries at a time."""
        granted = False
        while True:
            try:
                if not self._scheduler.cluster.holds(LEASE_SWEEP):
                    granted = False
                elif not granted:
                    # However long nobody swept (the control plane, or every replica, was down),
                    # agents get a whole lease to come back.
                    await self._store.extend_all_leases(self._clock() + self.duration)
                    granted = True
                if granted:
                    await self.sweep()
            except StorageUnavailable as exc:  # nothing lapses while nothing can be written
                log.warning("lease_sweep_deferred", error=str(exc))
            except Exception:
                log.exception("lease_sweep_failed")
            await asyncio.sleep(self.sweep_interval.total_seconds())
