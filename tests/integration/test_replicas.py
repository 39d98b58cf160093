"""Several control planes on one PostgreSQL database: two replicas of one
data dir, each with its own listeners, store pool and scheduler, and real
agents running real containers. What is asked of one replica takes effect
on the other: dispatch, cancel, revocation, tenancy, secret masking; the lease
sweep runs on exactly one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from docker import DockerClient

from testhide.agent.runtime.docker import DockerRuntime
from testhide.controlplane.cluster import LEASE_SWEEP, PgCluster
from testhide.controlplane.errors import NotFound
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus, LogChunk
from testhide.controlplane.jobs.service import JobService
from tests.harness import JOB_IMAGE, RunningControlPlane, control_plane, eventually, running_agent, serving

pytestmark = pytest.mark.timeout(600)

ORG = "default"


class Pair:
    def __init__(self, a: RunningControlPlane, b: RunningControlPlane) -> None:
        self.a, self.b = a, b


@pytest.fixture
async def pair(tmp_path: Path, pg_url: str) -> AsyncIterator[Pair]:
    async with control_plane(tmp_path, database_url=pg_url) as a, serving(a.data_dir, a.admin_key) as b:
        yield Pair(a, b)


def jobs_of(cp: RunningControlPlane) -> JobService:
    assert cp.daemon.jobs is not None
    return cp.daemon.jobs


async def followed(cp: RunningControlPlane, job_id: str, org: str = ORG) -> tuple[bytes, Job]:
    """The whole log and the final job, followed live through ``cp``."""
    out = bytearray()
    async for item in jobs_of(cp).follow(org, job_id, 0, follow=True):
        if isinstance(item, LogChunk):
            out += item.data
        else:
            return bytes(out), item
    raise AssertionError("the log ended without its job")


async def stored_log(cp: RunningControlPlane, job_id: str) -> bytes:
    chunks = [c.data async for c in jobs_of(cp).follow(ORG, job_id, 0, False) if isinstance(c, LogChunk)]
    return b"".join(chunks)


@pytest.mark.docker
@pytest.mark.slow
async def test_two_replicas_run_200_jobs_exactly_once_with_every_log_whole(
    pair: Pair, tmp_path: Path, docker_client: DockerClient
) -> None:
    runtime = DockerRuntime(docker_client)
    async with (
        running_agent(pair.a, tmp_path, runtime, name="on-a", max_jobs=4) as on_a,
        running_agent(pair.b, tmp_path, runtime, name="on-b", max_jobs=4) as on_b,
    ):
        ids: list[tuple[int, str]] = []
        for i in range(200):
            via = pair.a if i % 2 else pair.b
            spec = JobSpec(image=JOB_IMAGE, command=("sh", "-c", f"seq 1 {i + 1}; echo job-{i}"))
            ids.append((i, (await jobs_of(via).submit(ORG, spec)).id))
        # Each job followed through the replica it was not submitted to.
        results = await asyncio.gather(*(followed(pair.b if i % 2 else pair.a, job_id) for i, job_id in ids))
    agents = {on_a.agent_id: 0, on_b.agent_id: 0}
    for (i, job_id), (log, job) in zip(ids, results, strict=True):
        assert job.status == JobStatus.SUCCEEDED, (job_id, job.status_reason)
        expected = ("".join(f"{n}\n" for n in range(1, i + 2)) + f"job-{i}\n").encode()
        assert log == expected, f"job {i}: the followed log is not whole"
        assert await stored_log(pair.a, job_id) == expected, f"job {i}: the stored log is not whole"
        assigned = [t for t in job.transitions if t.status == JobStatus.ASSIGNED]
        assert len(assigned) == 1, f"job {i} was assigned {len(assigned)} times"
        agents[job.agent_id] += 1
    # Both replicas' agents worked: jobs crossed from the replica they were submitted to.
    assert all(count > 0 for count in agents.values()), agents


@pytest.mark.docker
async def test_a_job_submitted_to_one_replica_starts_on_an_agent_of_the_other(
    pair: Pair, tmp_path: Path, docker_client: DockerClient
) -> None:
    async with running_agent(pair.b, tmp_path, DockerRuntime(docker_client), name="on-b") as agent:
        job = await jobs_of(pair.a).submit(ORG, JobSpec(image=JOB_IMAGE, command=("echo", "crossed")))
        log, final = await followed(pair.a, job.id)
    assert final.status == JobStatus.SUCCEEDED
    assert final.agent_id == agent.agent_id
    assert log == b"crossed\n"


@pytest.mark.docker
async def test_cancel_through_one_replica_stops_the_job_on_the_others_agent(
    pair: Pair, tmp_path: Path, docker_client: DockerClient
) -> None:
    async with running_agent(pair.b, tmp_path, DockerRuntime(docker_client), name="on-b"):
        job = await jobs_of(pair.a).submit(
            ORG, JobSpec(image=JOB_IMAGE, command=("sh", "-c", "echo started; sleep 300"))
        )
        follow = jobs_of(pair.a).follow(ORG, job.id, 0, follow=True)
        first = await anext(follow)  # the job runs on B's agent and has written
        assert isinstance(first, LogChunk)
        assert first.data == b"started\n"
        await jobs_of(pair.a).cancel(ORG, job.id)
        final: Job | None = None
        async for item in follow:
            if isinstance(item, Job):
                final = item
                break
    assert final is not None
    assert final.status == JobStatus.CANCELED, final.status_reason
    # The agent stopped the container and reported it: the end came from the agent, through B.
    assert final.exit_code is not None


@pytest.mark.docker
async def test_a_revoked_agent_is_cut_off_by_the_replica_that_holds_its_stream(
    pair: Pair, tmp_path: Path, docker_client: DockerClient
) -> None:
    async with running_agent(pair.b, tmp_path, DockerRuntime(docker_client), name="on-b") as agent:
        assert pair.b.daemon.scheduler is not None
        session = pair.b.daemon.scheduler.session_of(agent.agent_id)
        assert session is not None
        assert pair.a.daemon._store is not None
        assert await pair.a.daemon._store.revoke_agent(agent.agent_id, datetime.now(UTC)) is not None
        await asyncio.wait_for(session.closed.wait(), 5)
        assert session.close_reason == ("PERMISSION_DENIED", "this agent has been revoked")


@pytest.mark.docker
async def test_tenancy_and_secret_masking_hold_across_replicas(
    pair: Pair, tmp_path: Path, docker_client: DockerClient
) -> None:
    assert pair.a.daemon._store is not None
    await pair.a.daemon._store.create_org("other", datetime.now(UTC))
    secret = "hunter2-across-replicas"
    await jobs_of(pair.a)._secrets.set(ORG, "TOKEN", secret.encode())
    async with running_agent(pair.b, tmp_path, DockerRuntime(docker_client), name="on-b"):
        job = await jobs_of(pair.a).submit(
            ORG, JobSpec(image=JOB_IMAGE, command=("sh", "-c", 'echo "token=$TOKEN"'), secrets=("TOKEN",))
        )
        log, final = await followed(pair.b, job.id)
    assert final.status == JobStatus.SUCCEEDED
    assert secret.encode() not in log
    assert log == b"token=***\n"
    for replica in (pair.a, pair.b):
        with pytest.raises(NotFound):
            await jobs_of(replica).get("other", job.id)


async def test_the_lease_sweep_runs_on_exactly_one_replica_and_moves_when_it_stops(
    tmp_path: Path, pg_url: str
) -> None:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(control_plane(tmp_path, database_url=pg_url))
        b_stack = AsyncExitStack()
        b = await b_stack.enter_async_context(serving(a.data_dir, a.admin_key))
        clusters = [cp.daemon.cluster for cp in (a, b)]
        assert all(isinstance(c, PgCluster) for c in clusters)
        holders = await eventually(
            lambda: [c for c in clusters if c is not None and c.holds(LEASE_SWEEP)],
            within=10,
            what="a replica to take the lease sweep",
        )
        assert len(holders) == 1
        # Stop the holder: the other takes the role once the holder's lease row is gone.
        if holders[0] is b.daemon.cluster:
            await b_stack.aclose()
            survivor = a
        else:
            await stack.aclose()
            survivor = b
        cluster = survivor.daemon.cluster
        assert cluster is not None
        await eventually(lambda: cluster.holds(LEASE_SWEEP), within=10, what="the survivor to take the sweep")
        await b_stack.aclose()


async def test_a_lost_job_is_retried_once_with_two_replicas_sweeping(tmp_path: Path, pg_url: str) -> None:
    lease = timedelta(seconds=2)  # whoever takes the sweep first grants every lease a whole one
    async with (
        control_plane(tmp_path, database_url=pg_url, job_lease=lease) as a,
        serving(a.data_dir, a.admin_key, job_lease=lease),
    ):
        assert a.daemon._store is not None
        store = a.daemon._store
        job = await jobs_of(a).submit(ORG, JobSpec(image=JOB_IMAGE, command=("true",), retries=1))
        now = datetime.now(UTC)
        assigned = await store.assign_job(ORG, job.id, "gone-agent", now, now + timedelta(milliseconds=1))
        assert assigned is not None
        await store.set_job_status(ORG, job.id, assigned.epoch, JobStatus.RUNNING, now, "")

        async def retried() -> Job | None:
            lost = await store.get_job(ORG, job.id)
            return lost if lost is not None and lost.retried_as else None

        lost = await eventually(retried, within=15, what="the LOST job to be retried")
        assert lost.status == JobStatus.LOST
        retries = [j for j in await store.list_jobs(ORG, 50, None) if j.retry_of == job.id]
        assert len(retries) == 1
