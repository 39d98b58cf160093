"""The control plane's half of the fetch step, through its real ports: a job with a
fetch step is refused in a pool without an egress list until an operator (from the
shell, or the Admin API) allows hosts, audited; the agent that takes the job is
handed the pool's list and the fetch step's secrets, and what it reports of the
fetch step is what `Get` and `List` show; services' logs are kept as artifacts. A bare
agent on a real certificate; no Docker. SQLite and PostgreSQL."""

from __future__ import annotations

import getpass
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from testhide.controlplane.auth.secrets import parse_api_key
from testhide.controlplane.errors import NotHeld
from testhide.controlplane.jobs.model import EgressRequest, FetchStep, PoolPolicy, ServiceSpec
from testhide.controlplane.store.base import Store
from testhide.protos.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, jobs_pb2, jobs_pb2_grpc
from tests.harness import JOB_IMAGE, RunningControlPlane, control_plane, operator
from tests.integration.test_agent_channel import BareAgent, enrolled_credentials, job_messages, told_to_stop
from tests.integration.test_store import NOW, assigned, empty_store, make_job, populate
from tests.pg import fresh_database

NO_EGRESS = (
    "pool default allows no egress, so the fetch step has nowhere to fetch from: an operator allows "
    "hosts with 'testhide-controlplane pools set default --egress-allow HOST[:PORT]' "
    "(or 'testhide admin pools set')"
)
FETCH = "wget -O /cache/index http://pypi.org/simple/"


@pytest.fixture(params=["sqlite", "postgres"])
async def cp(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(fresh_database()) if request.param == "postgres" else None
        yield await stack.enter_async_context(control_plane(tmp_path, database_url=url))


class Api:
    """The API port with the administrator's credential."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
        self.jobs = jobs_pb2_grpc.JobsStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)
        self.secrets = jobs_pb2_grpc.SecretsStub(channel)
        self.metadata = metadata

    async def call(self, stub: Any, method: str, request: Any) -> Any:
        return await getattr(stub, method)(request, metadata=self.metadata, timeout=30)

    async def refused(self, stub: Any, method: str, request: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await self.call(stub, method, request)
        return refused.value

    async def submit(self, spec: jobs_pb2.JobSpec) -> jobs_pb2.Job:
        answer: jobs_pb2.SubmitJobResponse = await self.call(
            self.jobs, "Submit", jobs_pb2.SubmitJobRequest(spec=spec)
        )
        return answer.job

    async def pool(self) -> jobs_pb2.Pool:
        listed: jobs_pb2.ListPoolsResponse = await self.call(
            self.jobs, "ListPools", jobs_pb2.ListPoolsRequest()
        )
        [pool] = listed.pools
        return pool


@pytest.fixture
async def api(cp: RunningControlPlane) -> AsyncIterator[Api]:
    async with grpc.aio.secure_channel(cp.api_target, grpc.ssl_channel_credentials(cp.ca_pem)) as channel:
        yield Api(channel, await cp.bearer())


def fetching(**changes: Any) -> jobs_pb2.JobSpec:
    fields: dict[str, Any] = {"image": JOB_IMAGE, "command": ["true"], "fetch": FETCH, **changes}
    return jobs_pb2.JobSpec(**fields)


async def operated(cp: RunningControlPlane, *args: str) -> tuple[int, str, str]:
    return await operator(*args, "--data-dir", str(cp.data_dir))


async def pool_updates(cp: RunningControlPlane) -> list[tuple[str, list[str]]]:
    """Who changed the default pool's policy, and its egress list after each change."""
    assert cp.daemon._store is not None
    entries, _ = await cp.daemon._store.read_audit()
    return [
        (e.event.actor, e.event.details["egress_allow"])
        for e in entries
        if e.event.action == "pool_updated" and e.event.target == "default"
    ]


async def test_an_operator_allows_egress_from_the_shell_and_a_fetch_step_is_taken(
    cp: RunningControlPlane, api: Api
) -> None:
    refused = await api.refused(api.jobs, "Submit", jobs_pb2.SubmitJobRequest(spec=fetching()))
    assert (refused.code(), refused.details()) == (grpc.StatusCode.FAILED_PRECONDITION, NO_EGRESS)
    assert not (await api.call(api.jobs, "List", jobs_pb2.ListJobsRequest())).jobs  # nothing stored

    code, _, err = await operated(
        cp, "pools", "set", "default", "--egress-allow", "PyPI.org", "--egress-allow", ".debian.org:80"
    )
    assert code == 0, err
    assert "egress pypi.org, .debian.org:80" in err
    assert list((await api.pool()).egress_allow) == ["pypi.org", ".debian.org:80"]
    submitted = await api.submit(fetching())
    assert submitted.status == jobs_pb2.JOB_STATUS_QUEUED
    assert submitted.spec.fetch == FETCH
    code, out, err = await operated(cp, "pools", "list", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["egress_allow"] == ["pypi.org", ".debian.org:80"]

    # Another change keeps the list; a bad entry is a usage error naming it, and changes nothing.
    assert (await operated(cp, "pools", "set", "default", "--pull-policy", "never"))[0] == 0
    code, _, err = await operated(
        cp, "pools", "set", "default", "--egress-allow", "ok.org", "--egress-allow", "x:0"
    )
    assert code == 2, err
    assert "egress entry 'x:0' is not HOST or HOST:PORT" in err
    code, _, err = await operated(cp, "pools", "set", "default", "--egress-allow", "a.org", "--no-egress")
    assert (code, "give --egress-allow or --no-egress, not both" in err) == (2, True), err

    code, _, err = await operated(cp, "pools", "set", "default", "--no-egress")
    assert (code, "egress none" in err) == (0, True), err
    refused = await api.refused(api.jobs, "Submit", jobs_pb2.SubmitJobRequest(spec=fetching()))
    assert (refused.code(), refused.details()) == (grpc.StatusCode.FAILED_PRECONDITION, NO_EGRESS)
    me = f"operator:{getpass.getuser()}"
    assert await pool_updates(cp) == [
        (me, ["pypi.org", ".debian.org:80"]),
        (me, ["pypi.org", ".debian.org:80"]),
        (me, []),
    ]


async def test_an_administrator_allows_egress_through_the_admin_api(
    cp: RunningControlPlane, api: Api
) -> None:
    set_policy = admin_pb2.SetPoolPolicyRequest
    pool = await api.call(
        api.admin, "SetPoolPolicy", set_policy(pool="default", egress_allow=["pypi.org:443"])
    )
    assert list(pool.egress_allow) == ["pypi.org:443"]
    assert list((await api.pool()).egress_allow) == ["pypi.org:443"]
    assert (await api.submit(fetching())).status == jobs_pb2.JOB_STATUS_QUEUED

    # Empty keeps the list, a list replaces it; no_egress clears it.
    pool = await api.call(api.admin, "SetPoolPolicy", set_policy(pool="default", runtime="runc"))
    assert list(pool.egress_allow) == ["pypi.org:443"]
    pool = await api.call(api.admin, "SetPoolPolicy", set_policy(pool="default", egress_allow=["10.0.0.7"]))
    assert list(pool.egress_allow) == ["10.0.0.7"]
    for bad, message in (
        (set_policy(pool="default", egress_allow=["a.org", "http://b.org"]), "egress entry 'http://b.org'"),
        (set_policy(pool="default", egress_allow=[f"h{i}.org" for i in range(65)]), "at most 64 egress"),
        (set_policy(pool="default", egress_allow=["a.org"], no_egress=True), "not both"),
    ):
        refused = await api.refused(api.admin, "SetPoolPolicy", bad)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (refused.details() or "")
    assert list((await api.pool()).egress_allow) == ["10.0.0.7"]
    pool = await api.call(api.admin, "SetPoolPolicy", set_policy(pool="default", no_egress=True))
    assert list(pool.egress_allow) == []
    refused = await api.refused(api.jobs, "Submit", jobs_pb2.SubmitJobRequest(spec=fetching()))
    assert (refused.code(), refused.details()) == (grpc.StatusCode.FAILED_PRECONDITION, NO_EGRESS)
    updates = await pool_updates(cp)
    assert [egress for _, egress in updates] == [["pypi.org:443"], ["pypi.org:443"], ["10.0.0.7"], []]
    assert {actor for actor, _ in updates} == {f"api_key:{parse_api_key(cp.admin_key).key_id}"}


def fetched(job_id: str, epoch: int, fetch: jobs_pb2.FetchStep) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(fetched=agent_pb2.JobFetched(job_id=job_id, epoch=epoch, fetch=fetch))


def fetch_report() -> jobs_pb2.FetchStep:
    at = Timestamp(seconds=int(NOW.timestamp()))
    allowed = jobs_pb2.EgressRequest(
        at=at, method="CONNECT", host="pypi.org", port=443, allowed=True, http_status=200,
        bytes_sent=517, bytes_received=40960,
    )  # fmt: skip
    denied = jobs_pb2.EgressRequest(
        at=at, method="GET", host="evil.example", port=80, allowed=False, http_status=403,
        bytes_sent=90, bytes_received=3900,
    )  # fmt: skip
    report = jobs_pb2.FetchStep(cache="miss", exit_code=0, requests=[allowed, denied])
    report.duration.FromTimedelta(timedelta(seconds=3.25))
    return report


async def upload(
    agent: BareAgent, job_id: str, epoch: int, path: str, data: bytes
) -> tuple[grpc.StatusCode, str]:
    header = agent_pb2.ArtifactHeader(
        job_id=job_id,
        epoch=epoch,
        path=path,
        kind=agent_pb2.ARTIFACT_KIND_SERVICE_LOG,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )

    async def parts() -> AsyncIterator[agent_pb2.ArtifactUpload]:
        yield agent_pb2.ArtifactUpload(header=header)
        yield agent_pb2.ArtifactUpload(data=data)

    try:
        stored = await agent.stub.UploadArtifact(parts(), timeout=30)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, stored.path


async def test_the_agent_gets_the_egress_list_and_fetch_secrets_and_its_report_is_shown(
    cp: RunningControlPlane, api: Api, tmp_path: Path
) -> None:
    set_policy = admin_pb2.SetPoolPolicyRequest(pool="default", egress_allow=["pypi.org", ".debian.org:80"])
    await api.call(api.admin, "SetPoolPolicy", set_policy)
    for name, value in (("PYPI_TOKEN", b"pypi-s3cret"), ("DEPLOY_KEY", b"deploy-s3cret")):
        await api.call(api.secrets, "Set", jobs_pb2.SetSecretRequest(name=name, value=value))
    db = jobs_pb2.ServiceSpec(name="db", image=JOB_IMAGE, command=["httpd", "-f"], tmpfs=["/var/run"])
    spec = fetching(fetch_secrets=["PYPI_TOKEN"], secrets=["DEPLOY_KEY"], cache="pip-1", services=[db])
    job_id = (await api.submit(spec)).id

    async with BareAgent(cp, await enrolled_credentials(cp, tmp_path, "holder", "default")) as agent:
        # The job waits already: its assignment races the answer to the hello's fence, so it
        # comes among connect()'s answers or right after them.
        answered = [m for m in await agent.connect() if m.WhichOneof("body") == "assign"]
        assign = answered[0].assign if answered else (await agent.read()).assign
        assert assign.job_id == job_id
        assert list(assign.egress_allow) == ["pypi.org", ".debian.org:80"]
        assert dict(assign.fetch_secret_env) == {"PYPI_TOKEN": "pypi-s3cret"}
        assert dict(assign.secret_env) == {"DEPLOY_KEY": "deploy-s3cret"}  # the job's alone
        assert (assign.spec.fetch, assign.spec.cache, list(assign.spec.services)) == (FETCH, "pip-1", [db])
        epoch = assign.epoch
        secrets = (await api.call(api.secrets, "List", jobs_pb2.ListSecretsRequest())).secrets
        assert {s.name: s.last_used_by_job for s in secrets} == {"PYPI_TOKEN": job_id, "DEPLOY_KEY": job_id}

        # From another epoch: told to stop, nothing kept.
        assert told_to_stop(
            [str(a) for a in await agent.exchange([fetched(job_id, epoch + 1, fetch_report())])]
        )
        assert not (await api.call(api.jobs, "Get", jobs_pb2.GetJobRequest(job_id=job_id))).HasField("fetch")
        assert await agent.exchange([fetched(job_id, epoch, fetch_report())]) == []
        assert await agent.exchange(job_messages("started", job_id, epoch)) == []

        shown = await api.call(api.jobs, "Get", jobs_pb2.GetJobRequest(job_id=job_id))
        assert shown.status == jobs_pb2.JOB_STATUS_RUNNING
        assert shown.fetch == fetch_report()
        [listed] = (await api.call(api.jobs, "List", jobs_pb2.ListJobsRequest())).jobs
        assert listed.fetch == fetch_report()

        # The service's log is kept as the job's files are, at services/NAME.log only.
        assert await upload(agent, job_id, epoch, "services/db.log", b"db ready\n") == (
            grpc.StatusCode.OK,
            "services/db.log",
        )
        code, details = await upload(agent, job_id, epoch, "services/cache.log", b"x")
        assert (code, "services/NAME.log for a service of job" in details) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            True,
        )
        found = (await api.call(api.jobs, "ListArtifacts", jobs_pb2.JobRef(job_id=job_id))).artifacts
        assert [(a.path, a.size) for a in found] == [("services/db.log", 9)]
        assert cp.daemon.jobs is not None
        assert [a.kind for a in await cp.daemon.jobs.artifacts("default", job_id)] == ["service_log"]
        chunks = api.jobs.DownloadArtifact(
            jobs_pb2.DownloadArtifactRequest(job_id=job_id, path="services/db.log"), metadata=api.metadata
        )
        assert b"".join([c.data async for c in chunks]) == b"db ready\n"


# ---------------------------------------------------------------- the stores, both backends

FETCHED = FetchStep(
    cache="hit",
    exit_code=0,
    duration_s=0.5,
    requests=(EgressRequest(NOW, "CONNECT", "pypi.org", 443, True, 200, 10, 20),),
)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    async with empty_store(request.param, tmp_path) as s:
        await populate(s)
        yield s


async def test_stores_keep_a_pools_egress_list_with_its_policy(store: Store) -> None:
    assert (await store.pool_policy("acme", "default")).egress_allow == ()
    await store.set_pool_policy("acme", "default", PoolPolicy(egress_allow=("pypi.org", "10.0.0.1:8080")))
    assert (await store.pool_policy("acme", "default")).egress_allow == ("pypi.org", "10.0.0.1:8080")
    assert (await store.pool_policy("other", "default")).egress_allow == ()
    listed = {(p.org, p.name): p.policy.egress_allow for p in await store.list_pools()}
    assert listed == {("acme", "default"): ("pypi.org", "10.0.0.1:8080"), ("other", "default"): ()}
    await store.set_pool_policy("acme", "default", PoolPolicy())
    assert (await store.pool_policy("acme", "default")).egress_allow == ()


async def test_a_fetch_step_is_stored_from_the_holder_only(store: Store) -> None:
    await assigned(store, "j1")  # held by agent-1 at epoch 1
    with pytest.raises(NotHeld):
        await store.record_fetch("acme", "j1", "agent-2", 1, FETCHED)
    with pytest.raises(NotHeld):
        await store.record_fetch("acme", "j1", "agent-1", 2, FETCHED)
    with pytest.raises(NotHeld):
        await store.record_fetch("other", "j1", "agent-1", 1, FETCHED)
    assert (await store.get_job("acme", "j1")).fetch is None  # type: ignore[union-attr]
    await store.record_fetch("acme", "j1", "agent-1", 1, FETCHED)
    job = await store.get_job("acme", "j1")
    assert job is not None
    assert job.fetch == FETCHED
    [listed] = await store.list_jobs("acme", 10, None)
    assert listed.fetch == FETCHED


async def test_a_spec_with_a_fetch_step_and_services_is_stored_whole(store: Store) -> None:
    services = (ServiceSpec("db", "postgres:16", ("postgres",), {"A": "1"}, ("/var/run",)),)
    job = make_job("j2", fetch="true", fetch_secrets=("T",), cache="k", services=services)
    await store.create_job(job, b"wrapped-key")
    stored = await store.get_job("acme", "j2")
    assert stored is not None
    assert stored.spec == job.spec
    assert stored.spec.services == services
