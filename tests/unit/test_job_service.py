"""controlplane/jobs/service.py on in-memory stores (tests/unit/fakes.py):
what users submit and cancel, and whose word about a job is taken."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from testhide.common.identity import AgentIdentity
from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.errors import FailedPrecondition, InvalidArgument, NotFound, NotHeld
from testhide.controlplane.jobs.blobs import BlobVault
from testhide.controlplane.jobs.leases import Leases
from testhide.controlplane.jobs.logs import LogBook
from testhide.controlplane.jobs.model import Job, JobSpec, JobStatus, PoolPolicy
from testhide.controlplane.jobs.scheduler import AgentSession, Cancel, ResultAck, Scheduler
from testhide.controlplane.jobs.secrets import SecretVault
from testhide.controlplane.jobs.service import JobService
from tests.unit.fakes import MemoryJobs, MemorySecrets, UnusedBlobs, UnusedLeases, UnusedLogs

START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
LEASE = timedelta(seconds=60)
SPEC = JobSpec(image="busybox:1.36", command=("sh", "-c", "true"))


class World:
    """A JobService wired as daemon.py wires it, on fakes."""

    def __init__(self, policy: PoolPolicy | None = None) -> None:
        master = MasterKey.generate()
        self.store = MemoryJobs({("acme", "default"): policy or PoolPolicy()})
        self.secret_store = MemorySecrets()
        self.scheduler = Scheduler(self.store, lease=LEASE)
        logs = LogBook(UnusedLogs(), master)
        self.secrets = SecretVault(self.secret_store, master)
        leases = Leases(UnusedLeases(), master, self.scheduler, logs, LEASE)
        self.jobs = JobService(
            self.store, master, self.scheduler, logs, BlobVault(UnusedBlobs(), master), self.secrets, leases
        )

    async def running(self, agent_id: str = "a1") -> tuple[Job, AgentSession]:
        """A submitted job, assigned to a connected agent that started it."""
        job = await self.jobs.submit("acme", SPEC)
        session = AgentSession(AgentIdentity("td", "acme", "default", agent_id), 1, START + LEASE, "ca")
        self.scheduler.attach(session)
        assigned = await self.store.assign_job("acme", job.id, agent_id, START, START + LEASE)
        assert assigned is not None
        session.jobs.add(job.id)
        await self.jobs.on_started(session, job.id, assigned.epoch)
        return self.store.jobs[job.id], session


@pytest.fixture
def world() -> World:
    return World()


async def test_submit_queues_a_valid_job_and_says_what_it_waits_for(world: World) -> None:
    job = await world.jobs.submit("acme", SPEC)

    assert job.status == JobStatus.QUEUED
    assert world.store.jobs[job.id].spec == SPEC
    assert world.store.data_keys[job.id]  # sealed with a data key of its own
    seen = await world.jobs.get("acme", job.id)
    assert seen.status_reason == "waiting: no agent of pool 'default' is connected"
    listed, more = await world.jobs.list("acme", 10, "")
    assert ([j.id for j in listed], more) == ([job.id], "")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (JobSpec(image="", command=("true",)), "is not a valid image reference"),
        (JobSpec(image="busybox", command=()), "command must not be empty"),
        (JobSpec(image="busybox", command=("true",), pool="gpu"), "pool 'gpu' does not exist"),
        (JobSpec(image="busybox", command=("true",), secrets=("TOKEN",)), "secrets not found"),
        (JobSpec(image="busybox", command=("true",), workspace_id="b" + "0" * 24), "workspace b0+ not found"),
    ],
)
async def test_submit_refuses_an_invalid_job_and_stores_nothing(
    world: World, spec: JobSpec, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        await world.jobs.submit("acme", spec)
    assert world.store.jobs == {}


async def test_submit_with_a_secret_that_exists_is_queued(world: World) -> None:
    await world.secrets.set("acme", "TOKEN", b"s3cret")

    job = await world.jobs.submit("acme", JobSpec(image="busybox", command=("true",), secrets=("TOKEN",)))

    assert job.status == JobStatus.QUEUED
    details = await world.jobs.assignment_details(job)
    assert details.secret_env == {"TOKEN": "s3cret"}


async def test_an_image_the_pool_does_not_allow_is_recorded_as_error() -> None:
    world = World(PoolPolicy(allowed_images=("registry.example/*",)))

    job = await world.jobs.submit("acme", SPEC)

    assert job.status == JobStatus.ERROR
    assert "image 'busybox:1.36' is not allowed in pool 'default'" in job.status_reason
    assert world.store.jobs[job.id].status == JobStatus.ERROR


async def test_cancel_of_a_queued_job_ends_it_and_a_second_cancel_is_refused(world: World) -> None:
    job = await world.jobs.submit("acme", SPEC)

    canceled = await world.jobs.cancel("acme", job.id)

    assert (canceled.status, canceled.status_reason) == (JobStatus.CANCELED, "canceled by user")
    with pytest.raises(FailedPrecondition, match="already ended"):
        await world.jobs.cancel("acme", job.id)


async def test_cancel_of_a_running_job_asks_its_agent(world: World) -> None:
    job, session = await world.running()
    assert job.status == JobStatus.RUNNING

    answer = await world.jobs.cancel("acme", job.id)

    assert answer.status == JobStatus.RUNNING  # until the agent reports how it ended
    assert await session.outbox.get() == Cancel(job.id, "canceled by user")


async def test_another_org_cannot_see_or_cancel_a_job(world: World) -> None:
    job = await world.jobs.submit("acme", SPEC)
    with pytest.raises(NotFound, match="not found"):
        await world.jobs.cancel("other", job.id)
    assert world.store.jobs[job.id].status == JobStatus.QUEUED


async def test_a_result_from_an_agent_that_does_not_hold_the_job_is_refused(world: World) -> None:
    job, holder = await world.running("a1")
    stranger = AgentSession(AgentIdentity("td", "acme", "default", "a2"), 1, START + LEASE, "ca")

    with pytest.raises(NotHeld):
        await world.jobs.on_result(stranger, job.id, job.epoch, 0, JobStatus.SUCCEEDED, 0, "")
    with pytest.raises(NotHeld):  # nor from the holder at an old epoch
        await world.jobs.on_result(holder, job.id, job.epoch - 1, 0, JobStatus.SUCCEEDED, 0, "")
    assert world.store.jobs[job.id].status == JobStatus.RUNNING
    assert len(stranger.outbox) == 0

    await world.jobs.on_result(holder, job.id, job.epoch, 0, JobStatus.FAILED, 3, "exit status 3")

    ended = world.store.jobs[job.id]
    assert (ended.status, ended.exit_code) == (JobStatus.FAILED, 3)
    assert await holder.outbox.get() == ResultAck(job.id)
    assert job.id not in holder.jobs
