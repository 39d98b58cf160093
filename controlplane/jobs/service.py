"""What users and agents do with jobs. Callers pass the organisation they are
authenticated for; agents' org and pool come from their certificates."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import structlog

from controlplane.atrest import MasterKey
from controlplane.errors import FailedPrecondition, InvalidArgument, NotFound, StaleEpoch
from controlplane.jobs.logs import LogBook
from controlplane.jobs.model import Job, JobSpec, JobStatus, LogChunk, LogStream
from controlplane.jobs.scheduler import AgentSession, Cancel, LogAck, ResultAck, Scheduler
from controlplane.jobs.validation import validate_spec
from controlplane.store.base import Store

log = structlog.get_logger("testhide.jobs")

MAX_PAGE = 200
# How long a follower waits before re-reading the store even without a wake-up
# (another replica may have written).
FOLLOW_RECHECK_S = 5.0


def new_job_id() -> str:
    """Sortable by creation time, unguessable."""
    return f"j{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class JobService:
    def __init__(self, store: Store, master: MasterKey, scheduler: Scheduler, logs: LogBook) -> None:
        self._store = store
        self._master = master
        self._scheduler = scheduler
        self._logs = logs

    # users --------------------------------------------------------------------
    async def submit(self, org: str, spec: JobSpec) -> Job:
        validate_spec(spec)
        if not await self._store.pool_exists(org, spec.pool):
            raise InvalidArgument(f"pool {spec.pool!r} does not exist in this organisation")
        job_id = new_job_id()
        _, wrapped = self._master.new_data_key(aad=job_id.encode())
        job = Job(id=job_id, org=org, spec=spec, status=JobStatus.QUEUED, created_at=datetime.now(UTC))
        await self._store.create_job(job, wrapped)
        log.info("job_submitted", job_id=job_id, org=org, pool=spec.pool, image=spec.image)
        self._scheduler.kick(org, spec.pool)
        return job

    async def get(self, org: str, job_id: str) -> Job:
        job = await self._store.get_job(org, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    async def list(self, org: str, page_size: int, page_token: str) -> tuple[list[Job], str]:
        size = min(max(page_size or 50, 1), MAX_PAGE)
        jobs = await self._store.list_jobs(org, size + 1, page_token or None)
        more = len(jobs) > size
        jobs = jobs[:size]
        return jobs, (jobs[-1].id if more else "")

    async def cancel(self, org: str, job_id: str) -> Job:
        job = await self.get(org, job_id)
        if job.status.terminal:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.status.value})")
        session = self._scheduler.session_of(job.agent_id) if job.agent_id else None
        if job.status == JobStatus.QUEUED or session is None or job_id not in session.jobs:
            job = await self._store.set_job_status(org, job_id, None, JobStatus.CANCELED, datetime.now(UTC),
                                                   "canceled by user")
            self._logs.notify(job_id)
            return job
        session.send(Cancel(job_id, "canceled by user"))
        log.info("job_cancel_requested", job_id=job_id, agent_id=job.agent_id)
        return job

    async def follow(self, org: str, job_id: str, offset: int, follow: bool) -> AsyncIterator[LogChunk | Job]:
        """Log chunks from ``offset``; with ``follow``, until the job has ended
        and all its log was sent, then the final job."""
        if offset < 0:
            raise InvalidArgument("from_offset must not be negative")
        await self.get(org, job_id)
        while True:
            changed = self._logs.changed(job_id)
            job = await self.get(org, job_id)
            async for chunk in self._logs.read(org, job_id, offset):
                offset = chunk.offset + len(chunk.data)
                yield chunk
            if not follow:
                return
            if job.status.terminal and offset >= job.log_size:
                yield job
                return
            if offset >= job.log_size:
                try:
                    async with asyncio.timeout(FOLLOW_RECHECK_S):
                        await changed.wait()
                except TimeoutError:
                    pass

    # agents -------------------------------------------------------------------
    async def _owned(self, session: AgentSession, job_id: str, epoch: int) -> Job:
        job = await self._store.get_job(session.identity.org, job_id)
        if job is None or job.agent_id != session.identity.agent_id:
            raise NotFound(f"job {job_id} is not assigned to this agent")
        if job.epoch != epoch:
            raise StaleEpoch(f"job {job_id} was reassigned (epoch {job.epoch}, not {epoch})")
        return job

    async def on_hello(self, session: AgentSession, running: dict[str, int]) -> None:
        """Reconcile what the agent says it runs with what the store says."""
        org = session.identity.org
        for job in await self._store.jobs_of_agent(org, session.identity.agent_id):
            if running.get(job.id) == job.epoch:
                session.jobs.add(job.id)
            elif job.status == JobStatus.ASSIGNED:
                await self._store.set_job_status(org, job.id, job.epoch, JobStatus.QUEUED, datetime.now(UTC),
                                                 "agent reconnected without it; requeued")
            else:
                await self._store.set_job_status(org, job.id, job.epoch, JobStatus.LOST, datetime.now(UTC),
                                                 "agent reconnected without it")
                self._logs.notify(job.id)
        for job_id in running.keys() - session.jobs:
            session.send(Cancel(job_id, "this agent no longer holds the job"))
        self._scheduler.kick(org, session.identity.pool)

    async def on_started(self, session: AgentSession, job_id: str, epoch: int) -> None:
        job = await self._owned(session, job_id, epoch)
        if job.status == JobStatus.ASSIGNED:
            await self._store.set_job_status(job.org, job_id, epoch, JobStatus.RUNNING, datetime.now(UTC))
            log.info("job_started", job_id=job_id, agent_id=session.identity.agent_id)

    async def on_log_batch(self, session: AgentSession, job_id: str, epoch: int, seq: int,
                           entries: list[tuple[LogStream, bytes]]) -> None:
        stored = await self._logs.append(session.identity.org, job_id, epoch, seq, entries)
        session.send(LogAck(job_id, stored))

    async def on_result(self, session: AgentSession, job_id: str, epoch: int, last_seq: int,
                        status: JobStatus, exit_code: int | None, reason: str) -> None:
        job = await self._owned(session, job_id, epoch)
        if job.last_seq != last_seq:
            raise FailedPrecondition(f"result of job {job_id} arrived before its log ({job.last_seq}/{last_seq})")
        if not job.status.terminal:
            await self._store.set_job_status(job.org, job_id, epoch, status, datetime.now(UTC), reason, exit_code)
            log.info("job_finished", job_id=job_id, status=status.value, exit_code=exit_code)
        session.jobs.discard(job_id)
        session.send(ResultAck(job_id))
        self._logs.notify(job_id)
        self._scheduler.kick(session.identity.org, session.identity.pool)
