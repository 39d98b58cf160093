"""controlplane/jobs/leases.py with an injected clock on a SQLite store in
tmp_path: no sockets, no sleeping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from testhide.common.identity import AgentIdentity
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.jobs.leases import Leases
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus
from testhide.controlplane.jobs.scheduler import AgentSession, Cancel, Scheduler
from testhide.controlplane.store.sqlite import SqliteStore

START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
LEASE = timedelta(seconds=60)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "testhide.db")
    await s.create_org("acme", START)
    await s.create_pool("acme", "default", START)
    try:
        yield s
    finally:
        await s.close()


def session(agent_id: str = "agent-1") -> AgentSession:
    return AgentSession(AgentIdentity("td", "acme", "default", agent_id), 1, START + timedelta(hours=1), "ca")


async def running_job(store: SqliteStore, job_id: str, retries: int = 0) -> Job:
    spec = JobSpec(image="busybox", command=("true",), retries=retries)
    await store.create_job(Job(job_id, "acme", spec, JobStatus.QUEUED, START), b"k")
    job = await store.assign_job("acme", job_id, "agent-1", START, START + LEASE)
    assert job is not None
    running, _ = await store.report_job("acme", job_id, "agent-1", job.epoch, JobStatus.RUNNING, START)
    return running


def leases(store: SqliteStore, scheduler: Scheduler, clock: Clock) -> Leases:
    return Leases(store, MasterKey.generate(), scheduler, LogBook(store, MasterKey.generate()), LEASE, clock)


async def test_heartbeats_keep_a_job_and_silence_loses_it(store: SqliteStore) -> None:
    clock, scheduler = Clock(), Scheduler(store, lease=LEASE)
    keeper = leases(store, scheduler, clock)
    job = await running_job(store, "j1")
    agent = session()
    agent.jobs.add("j1")
    scheduler.attach(agent)
    for _ in range(3):  # each heartbeat buys a whole lease from now
        clock.now += LEASE / 2
        await keeper.extend(agent, {"j1": job.epoch})
        await keeper.sweep()
        current = await store.get_job("acme", "j1")
        assert current is not None
        assert current.status == JobStatus.RUNNING
    clock.now += LEASE + timedelta(seconds=1)
    await keeper.sweep()
    lost = await store.get_job("acme", "j1")
    assert lost is not None
    assert lost.status == JobStatus.LOST
    assert lost.epoch == job.epoch + 1
    # Its (still connected) holder is told to drop the job and report nothing more.
    assert "j1" not in agent.jobs
    assert len(agent.outbox) == 1
    assert await agent.outbox.get() == Cancel("j1", lost.status_reason, abandon=True)


async def test_a_lost_job_is_retried_as_asked_once(store: SqliteStore) -> None:
    clock = Clock()
    keeper = leases(store, Scheduler(store, lease=LEASE), clock)
    await running_job(store, "j1", retries=1)
    await running_job(store, "j2")
    clock.now += 2 * LEASE
    await keeper.sweep()
    lost = await store.get_job("acme", "j1")
    assert lost is not None
    assert lost.retried_as
    retry = await store.get_job("acme", lost.retried_as)
    assert retry is not None
    assert (retry.status, retry.attempt, retry.retry_of) == (JobStatus.QUEUED, 2, "j1")
    assert retry.created_at == clock.now
    other = await store.get_job("acme", "j2")
    assert other is not None
    assert other.retried_as == ""
    assert await keeper.retry_lost() == []  # once


async def test_release_of_a_job_that_moved_on_changes_nothing(store: SqliteStore) -> None:
    keeper = leases(store, Scheduler(store, lease=LEASE), Clock())
    job = await running_job(store, "j1")
    assert await keeper.release(job, JobStatus.LOST, "gone") is not None
    assert await keeper.release(job, JobStatus.LOST, "gone again") is None  # its epoch moved on
    final = await store.get_job("acme", "j1")
    assert final is not None
    assert [t.status for t in final.transitions].count(JobStatus.LOST) == 1
