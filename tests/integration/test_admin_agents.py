"""The Admin service's agents:admin half against a real control plane: enrollment tokens,
agents and pools, scoped, confined to the caller's organisation, audited with the caller;
pausing a pool, and revoking an agent whose stream is open."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from testhide.agent.config import AgentConfig
from testhide.agent.daemon import Agent
from testhide.agent.errors import CredentialsError
from testhide.agent.rpc.enroll import enroll
from testhide.agent.runtime.base import ContainerExit, ContainerSpec, OutputQueue
from testhide.agent.runtime.fake import FakeContainer, FakeRuntime, Script
from testhide.controlplane.jobs.model import JobSpec, JobStatus
from testhide.protos.v1 import admin_pb2, admin_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.harness import (
    JOB_IMAGE,
    RunningControlPlane,
    control_plane,
    enrolled,
    eventually,
    in_status,
    job,
    running_agent,
)
from tests.pg import fresh_database

ADMIN_METHODS: list[tuple[str, Any]] = [
    ("CreateEnrollmentToken", admin_pb2.CreateEnrollmentTokenRequest(pool="default")),
    ("ListEnrollmentTokens", admin_pb2.ListEnrollmentTokensRequest()),
    ("RevokeEnrollmentToken", admin_pb2.RevokeEnrollmentTokenRequest(token_id="0123456789abcdef")),
    ("ListAgents", admin_pb2.ListAgentsRequest()),
    ("RevokeAgent", admin_pb2.RevokeAgentRequest(agent_id="a0123456789abcdef")),
    ("CreatePool", admin_pb2.CreatePoolRequest(pool="gpu")),
    ("SetPoolPolicy", admin_pb2.SetPoolPolicyRequest(pool="default", pull_policy="always")),
    ("PausePool", admin_pb2.PoolRef(pool="default")),
    ("ResumePool", admin_pb2.PoolRef(pool="default")),
]


class HeldRuntime(FakeRuntime):
    """Every job runs until the test releases it (or the agent stops it)."""

    async def start(self, spec: ContainerSpec, output: OutputQueue) -> FakeContainer:
        self.scripts.setdefault(spec.job_id, Script(hold=True))
        return await super().start(spec, output)

    def release(self, job_id: str, exit_code: int = 0) -> None:
        self.started[job_id]._exit(ContainerExit(exit_code))


class Api:
    """The API port with one credential."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
        self.admin = admin_pb2_grpc.AdminStub(channel)
        self.jobs = jobs_pb2_grpc.JobsStub(channel)
        self.metadata = metadata

    async def __call__(self, method: str, request: Any) -> Any:
        stub = self.jobs if method == "ListPools" else self.admin
        return await getattr(stub, method)(request, metadata=self.metadata, timeout=30)

    async def refused(self, method: str, request: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await self(method, request)
        return refused.value


@pytest.fixture(params=["sqlite", "postgres"])
async def cp(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    """On SQLite, and on PostgreSQL (a fresh database of the test cluster)."""
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(fresh_database()) if request.param == "postgres" else None
        yield await stack.enter_async_context(control_plane(tmp_path, database_url=url))


@pytest.fixture
async def connect(cp: RunningControlPlane) -> AsyncIterator[Callable[[str], Awaitable[Api]]]:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:

        async def as_key(key: str) -> Api:
            return Api(channel, await cp.bearer(key))

        yield as_key


async def audit(cp: RunningControlPlane) -> list[Any]:
    assert cp.daemon._store is not None
    entries, _ = await cp.daemon._store.read_audit()
    return [e.event for e in entries]


async def new_org(cp: RunningControlPlane, org: str, *pools: str) -> None:
    store = cp.daemon._store
    assert store is not None
    now = datetime.now(UTC)
    await store.create_org(org, now)
    for pool in ("default", *pools):
        await store.create_pool(org, pool, now)


async def test_every_agents_admin_method_needs_the_agents_admin_scope(
    cp: RunningControlPlane, connect: Callable[[str], Awaitable[Api]]
) -> None:
    engineer = await connect((await cp.api_key("default", "jobs:read", "jobs:write", "secrets:write"))[0])
    for method, request in ADMIN_METHODS:
        refused = await engineer.refused(method, request)
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED, method
        assert refused.details() == "this credential lacks the 'agents:admin' scope", method
    # Listing pools is the engineers' (jobs:read), not an administrator's alone.
    assert [p.name for p in (await engineer("ListPools", jobs_pb2.ListPoolsRequest())).pools] == ["default"]
    admin_only = await connect((await cp.api_key("default", "agents:admin"))[0])
    refused = await admin_only.refused("ListPools", jobs_pb2.ListPoolsRequest())
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not [e for e in await audit(cp) if e.action.startswith(("pool_", "enrollment_token_"))]


async def test_tokens_and_pools_are_administered_and_audited_with_the_caller(
    cp: RunningControlPlane, connect: Callable[[str], Awaitable[Api]], tmp_path: Path
) -> None:
    key, key_id = await cp.api_key("default", "agents:admin")
    admin = await connect(key)
    pool = await admin(
        "CreatePool", admin_pb2.CreatePoolRequest(pool="gpu", agent_cert_ttl=Duration(seconds=120))
    )
    assert (pool.name, pool.paused, pool.agent_cert_ttl.seconds, pool.agents_enrolled) == (
        "gpu",
        False,
        120,
        0,
    )
    refused = await admin.refused("CreatePool", admin_pb2.CreatePoolRequest(pool="gpu"))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    pool = await admin(
        "SetPoolPolicy",
        admin_pb2.SetPoolPolicyRequest(
            pool="gpu", allowed_images=["testhide/*"], pull_policy="never", runtime="runsc"
        ),
    )
    assert (list(pool.allowed_images), pool.pull_policy, pool.runtime) == (["testhide/*"], "never", "runsc")
    pool = await admin(
        "SetPoolPolicy", admin_pb2.SetPoolPolicyRequest(pool="gpu", any_image=True, runtime="job")
    )
    assert (list(pool.allowed_images), pool.pull_policy, pool.runtime) == ([], "never", "")
    for bad in (
        admin_pb2.SetPoolPolicyRequest(pool="gpu", pull_policy="sometimes"),
        admin_pb2.SetPoolPolicyRequest(pool="gpu", runtime="kata"),
        admin_pb2.SetPoolPolicyRequest(pool="gpu", any_image=True, allowed_images=["x/*"]),
        admin_pb2.SetPoolPolicyRequest(pool="gpu", agent_cert_ttl=Duration(seconds=5)),
    ):
        assert (await admin.refused("SetPoolPolicy", bad)).code() == grpc.StatusCode.INVALID_ARGUMENT

    created = await admin("CreateEnrollmentToken", admin_pb2.CreateEnrollmentTokenRequest(pool="gpu"))
    assert (created.info.pool, created.info.state) == ("gpu", "valid")
    lifetime = created.info.expires_at.ToDatetime() - created.info.created_at.ToDatetime()
    assert lifetime.total_seconds() == pytest.approx(600, abs=1)
    too_long = admin_pb2.CreateEnrollmentTokenRequest(pool="gpu", ttl=Duration(seconds=25 * 3600))
    assert (await admin.refused("CreateEnrollmentToken", too_long)).code() == grpc.StatusCode.INVALID_ARGUMENT
    credentials = await enroll(cp.api_target, created.token, tmp_path / "agent", "gpu-1")
    listed = (await admin("ListEnrollmentTokens", admin_pb2.ListEnrollmentTokensRequest())).tokens
    assert [(t.id, t.state) for t in listed] == [(created.info.id, "used")]
    spare = await admin("CreateEnrollmentToken", admin_pb2.CreateEnrollmentTokenRequest(pool="gpu"))
    revoked = await admin(
        "RevokeEnrollmentToken", admin_pb2.RevokeEnrollmentTokenRequest(token_id=spare.info.id)
    )
    assert revoked.state == "revoked"
    assert revoked.HasField("revoked_at")

    [agent] = (await admin("ListAgents", admin_pb2.ListAgentsRequest())).agents
    assert (agent.id, agent.name, agent.pool, agent.state) == (
        credentials.agent_id,
        "gpu-1",
        "gpu",
        "disconnected",
    )
    assert not agent.HasField("last_seen_at")
    assert (await admin("PausePool", admin_pb2.PoolRef(pool="gpu"))).paused
    assert not (await admin("ResumePool", admin_pb2.PoolRef(pool="gpu"))).paused
    ended = await admin("RevokeAgent", admin_pb2.RevokeAgentRequest(agent_id=agent.id))
    assert (ended.agent.state, list(ended.jobs_ended)) == ("revoked", [])

    events = [e for e in await audit(cp) if e.actor == f"api_key:{key_id}" and e.action != "login"]
    assert [(e.action, e.org, e.target) for e in events] == [
        ("pool_created", "default", "gpu"),
        ("pool_updated", "default", "gpu"),
        ("pool_updated", "default", "gpu"),
        ("enrollment_token_created", "default", created.info.id),
        ("enrollment_token_created", "default", spare.info.id),
        ("enrollment_token_revoked", "default", spare.info.id),
        ("pool_paused", "default", "gpu"),
        ("pool_resumed", "default", "gpu"),
        ("agent_revoked", "default", agent.id),
    ]
    assert all(e.source_ip.startswith("ipv4:127.0.0.1") for e in events)
    assert created.token not in repr(await audit(cp))


async def test_another_organisations_tokens_agents_and_pools_are_not_found(
    cp: RunningControlPlane, connect: Callable[[str], Awaitable[Api]], tmp_path: Path
) -> None:
    await new_org(cp, "acme", "secret-pool")
    acme = await connect((await cp.api_key("acme", "agents:admin", "jobs:read"))[0])
    theirs = await acme("CreateEnrollmentToken", admin_pb2.CreateEnrollmentTokenRequest(pool="secret-pool"))
    enrolled = await enroll(
        cp.api_target,
        (
            await acme("CreateEnrollmentToken", admin_pb2.CreateEnrollmentTokenRequest(pool="secret-pool"))
        ).token,
        tmp_path / "acme-agent",
        "acme-1",
    )
    ours = await connect((await cp.api_key("default", "agents:admin", "jobs:read"))[0])

    absent = await ours.refused("RevokeAgent", admin_pb2.RevokeAgentRequest(agent_id="a0000000000000000"))
    other = await ours.refused("RevokeAgent", admin_pb2.RevokeAgentRequest(agent_id=enrolled.agent_id))
    assert (other.code(), other.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"agent {enrolled.agent_id!r} not found",
    )
    assert absent.code() == grpc.StatusCode.NOT_FOUND
    refused = await ours.refused(
        "RevokeEnrollmentToken", admin_pb2.RevokeEnrollmentTokenRequest(token_id=theirs.info.id)
    )
    assert (refused.code(), refused.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"enrollment token {theirs.info.id!r} not found",
    )
    for method, request in (
        ("PausePool", admin_pb2.PoolRef(pool="secret-pool")),
        ("ResumePool", admin_pb2.PoolRef(pool="secret-pool")),
        ("SetPoolPolicy", admin_pb2.SetPoolPolicyRequest(pool="secret-pool", pull_policy="always")),
    ):
        refused = await ours.refused(method, request)
        assert (refused.code(), refused.details()) == (
            grpc.StatusCode.NOT_FOUND,
            "pool 'secret-pool' not found",
        )
    refused = await ours.refused(
        "CreateEnrollmentToken", admin_pb2.CreateEnrollmentTokenRequest(pool="secret-pool")
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "acme" not in (refused.details() or "")

    assert (await ours("ListAgents", admin_pb2.ListAgentsRequest())).agents == []
    assert (await ours("ListEnrollmentTokens", admin_pb2.ListEnrollmentTokensRequest())).tokens == []
    assert [p.name for p in (await ours("ListPools", jobs_pb2.ListPoolsRequest())).pools] == ["default"]
    # Nothing of acme's changed.
    [agent] = (await acme("ListAgents", admin_pb2.ListAgentsRequest())).agents
    assert agent.state == "disconnected"
    states = {
        t.id: t.state
        for t in (await acme("ListEnrollmentTokens", admin_pb2.ListEnrollmentTokensRequest())).tokens
    }
    assert states[theirs.info.id] == "valid"
    pools = {p.name: p for p in (await acme("ListPools", jobs_pb2.ListPoolsRequest())).pools}
    assert (pools["secret-pool"].paused, pools["secret-pool"].pull_policy) == (False, "if-not-present")
    assert not [
        e for e in await audit(cp) if e.org == "acme" and e.action in ("agent_revoked", "pool_paused")
    ]


def submit(cp: RunningControlPlane) -> Awaitable[Any]:
    assert cp.daemon.jobs is not None
    return cp.daemon.jobs.submit("default", JobSpec(image=JOB_IMAGE, command=("true",)))


async def test_a_paused_pool_finishes_what_runs_dispatches_nothing_new_and_resumes_at_once(
    cp: RunningControlPlane, connect: Callable[[str], Awaitable[Api]], tmp_path: Path
) -> None:
    runtime = HeldRuntime()
    admin = await connect((await cp.api_key("default", "agents:admin", "jobs:read"))[0])
    async with running_agent(cp, tmp_path, runtime, max_jobs=2) as agent:
        running = await submit(cp)
        await eventually(lambda: in_status(cp, running.id, JobStatus.RUNNING), 30, "the first job to run")
        paused = await admin("PausePool", admin_pb2.PoolRef(pool="default"))
        assert (paused.paused, paused.jobs_running, paused.agents_connected) == (True, 1, 1)

        waiting = await submit(cp)
        shown = await job(cp, waiting.id)
        assert shown.status == JobStatus.QUEUED
        assert shown.status_reason == (
            "waiting: pool 'default' is paused by an administrator; "
            "nothing new is dispatched until it is resumed"
        )
        runtime.release(running.id)
        await eventually(lambda: in_status(cp, running.id, JobStatus.SUCCEEDED), 30, "the running job to end")
        # The agent had a free slot all along (and one more now): only the pause keeps the job
        # queued, through the dispatch rounds its submission and the freed slot started.
        assert cp.daemon.scheduler is not None
        session = cp.daemon.scheduler.session_of(agent.agent_id)
        assert session is not None
        assert not session.closed.is_set()
        assert (await job(cp, waiting.id)).status == JobStatus.QUEUED
        [listed] = (await admin("ListAgents", admin_pb2.ListAgentsRequest())).agents
        assert listed.state == "connected"

        assert not (await admin("ResumePool", admin_pb2.PoolRef(pool="default"))).paused
        await eventually(lambda: in_status(cp, waiting.id, JobStatus.RUNNING), 5, "the waiting job to run")
        runtime.release(waiting.id)
        await eventually(lambda: in_status(cp, waiting.id, JobStatus.SUCCEEDED), 30, "it to end")


async def test_revoking_an_agent_over_the_api_cuts_its_open_stream_and_ends_its_job(
    cp: RunningControlPlane, connect: Callable[[str], Awaitable[Api]], tmp_path: Path
) -> None:
    admin = await connect((await cp.api_key("default", "agents:admin"))[0])
    agent = Agent(AgentConfig(data_dir=await enrolled(cp, tmp_path)), HeldRuntime())
    running = asyncio.create_task(agent.run())
    try:
        assert cp.daemon.scheduler is not None
        session = await asyncio.wait_for(cp.daemon.scheduler.wait_for_agent(agent.agent_id), 30)
        held = await submit(cp)
        await eventually(lambda: in_status(cp, held.id, JobStatus.RUNNING), 30, "the job to run")
        revoked = await admin("RevokeAgent", admin_pb2.RevokeAgentRequest(agent_id=agent.agent_id))
        assert (revoked.agent.state, list(revoked.jobs_ended)) == ("revoked", [held.id])
        # Closed by the call itself, not by the watcher's next look a second later.
        assert session.closed.is_set()
        assert session.close_reason == ("PERMISSION_DENIED", "this agent has been revoked")
        ended = await job(cp, held.id)
        assert (ended.status, ended.status_reason) == (JobStatus.ERROR, f"agent {agent.agent_id} was revoked")
        with pytest.raises(CredentialsError, match="this agent has been revoked"):
            await asyncio.wait_for(running, 30)  # the agent hears it and stops
    finally:
        if not running.done():
            agent.shutdown()
            await asyncio.wait_for(running, 60)
