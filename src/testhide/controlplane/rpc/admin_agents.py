"""The Admin service's ``agents:admin`` methods: enrollment tokens, agents, pools, and the
scope of an incident (everything one agent touched: `operations/incident.py`).

Each acts in the caller's organisation only (`operations/agents.py`). Beyond the operation,
this process does at once what other processes learn within a second: a revoked agent's
stream held here is closed, and a resumed pool's queued jobs are dispatched here and
announced to the other replicas."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from testhide.controlplane.errors import FailedPrecondition, InvalidArgument
from testhide.controlplane.operations import agents as ops
from testhide.controlplane.operations.incident import agent_incident
from testhide.controlplane.rpc.admin_context import AdminBase, AdminContext, actor
from testhide.controlplane.rpc.auth import current_principal
from testhide.controlplane.rpc.convert import pool_to_pb, since_from_pb, timestamp
from testhide.controlplane.rpc.convert_incident import incident_to_pb
from testhide.controlplane.rpc.status import mapped
from testhide.controlplane.store.base import EnrollmentTokenRecord
from testhide.protos.v1 import admin_pb2, jobs_pb2

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_TOKEN_TTL = timedelta(minutes=10)
MAX_TOKEN_TTL = timedelta(hours=24)


async def holders(admin: AdminContext) -> set[str]:
    return await admin.stream_holders() if admin.stream_holders is not None else set()


async def org_pools(admin: AdminContext, org: str) -> list[ops.PoolView]:
    """``org``'s pools as `Jobs.ListPools` shows them."""
    return await ops.list_pools(admin.store, org, await holders(admin))


def duration_from_pb(value: Duration, field: str, maximum: timedelta) -> timedelta:
    """Checked before conversion: 2**62 seconds overflows a timedelta."""
    if not (0 <= value.seconds <= maximum.total_seconds() and 0 <= value.nanos < 10**9):
        raise InvalidArgument(f"{field} must be between 0 and {maximum.total_seconds() / 3600:g}h")
    return value.ToTimedelta()


def token_to_pb(token: EnrollmentTokenRecord, now: datetime) -> admin_pb2.EnrollmentToken:
    pb = admin_pb2.EnrollmentToken(
        id=token.id,
        pool=token.pool,
        created_at=timestamp(token.created_at),
        expires_at=timestamp(token.expires_at),
        state=ops.token_state(token, now),
    )
    if token.used_at:
        pb.used_at.CopyFrom(timestamp(token.used_at))
    if token.revoked_at:
        pb.revoked_at.CopyFrom(timestamp(token.revoked_at))
    return pb


def agent_to_pb(view: ops.AgentView) -> admin_pb2.Agent:
    a = view.record
    pb = admin_pb2.Agent(
        id=a.id,
        name=a.name,
        pool=a.pool,
        host=a.host,
        version=a.version,
        labels=a.labels,
        runtimes=list(a.runtimes),
        max_jobs=a.max_jobs,
        running_jobs=a.running_jobs,
        state=view.state,
        enrolled_at=timestamp(a.enrolled_at),
        cert_not_after=timestamp(a.cert_not_after),
    )
    if a.last_seen_at:
        pb.last_seen_at.CopyFrom(timestamp(a.last_seen_at))
    if a.revoked_at:
        pb.revoked_at.CopyFrom(timestamp(a.revoked_at))
    return pb


class AgentsAdmin(AdminBase):
    @mapped
    async def CreateEnrollmentToken(
        self, request: admin_pb2.CreateEnrollmentTokenRequest, context: Context
    ) -> admin_pb2.CreateEnrollmentTokenResponse:
        ttl = duration_from_pb(request.ttl, "ttl", MAX_TOKEN_TTL) or DEFAULT_TOKEN_TTL
        if self._admin.certificates is None:
            raise FailedPrecondition("this control plane issues no enrollment tokens")
        ca_pem = self._admin.certificates.current.active_ca.certificate_pem
        org = current_principal().org
        token, record = await ops.create_enrollment_token(
            actor(self._admin, context), org, request.pool or "default", ttl, ca_pem
        )
        return admin_pb2.CreateEnrollmentTokenResponse(
            token=token, info=token_to_pb(record, datetime.now(UTC))
        )

    @mapped
    async def ListEnrollmentTokens(
        self, request: admin_pb2.ListEnrollmentTokensRequest, context: Context
    ) -> admin_pb2.ListEnrollmentTokensResponse:
        now = datetime.now(UTC)
        found = await ops.list_enrollment_tokens(self._admin.store, current_principal().org)
        return admin_pb2.ListEnrollmentTokensResponse(tokens=[token_to_pb(t, now) for t in found])

    @mapped
    async def RevokeEnrollmentToken(
        self, request: admin_pb2.RevokeEnrollmentTokenRequest, context: Context
    ) -> admin_pb2.EnrollmentToken:
        org = current_principal().org
        record = await ops.revoke_enrollment_token(actor(self._admin, context), org, request.token_id)
        return token_to_pb(record, datetime.now(UTC))

    @mapped
    async def ListAgents(
        self, request: admin_pb2.ListAgentsRequest, context: Context
    ) -> admin_pb2.ListAgentsResponse:
        found = await ops.list_agents(self._admin.store, current_principal().org, await holders(self._admin))
        return admin_pb2.ListAgentsResponse(agents=[agent_to_pb(v) for v in found])

    @mapped
    async def RevokeAgent(
        self, request: admin_pb2.RevokeAgentRequest, context: Context
    ) -> admin_pb2.RevokeAgentResponse:
        org = current_principal().org
        agent, jobs = await ops.revoke_agent(actor(self._admin, context), org, request.agent_id)
        scheduler = self._admin.scheduler
        session = scheduler.session_of(agent.id) if scheduler is not None else None
        if session is not None and session.identity.org == org:
            session.close("PERMISSION_DENIED", "this agent has been revoked")
        view = ops.agent_view(agent, set(), datetime.now(UTC))
        return admin_pb2.RevokeAgentResponse(agent=agent_to_pb(view), jobs_ended=jobs)

    @mapped
    async def CreatePool(self, request: admin_pb2.CreatePoolRequest, context: Context) -> jobs_pb2.Pool:
        ttl = None
        if request.HasField("agent_cert_ttl"):
            ttl = duration_from_pb(request.agent_cert_ttl, "agent_cert_ttl", timedelta(hours=24))
        org = current_principal().org
        await ops.create_pool(actor(self._admin, context), org, request.pool, ttl)
        return await self._pool(org, request.pool)

    @mapped
    async def SetPoolPolicy(self, request: admin_pb2.SetPoolPolicyRequest, context: Context) -> jobs_pb2.Pool:
        ttl = None
        if request.HasField("agent_cert_ttl"):
            ttl = duration_from_pb(request.agent_cert_ttl, "agent_cert_ttl", timedelta(hours=24))
        change = ops.PolicyChange(
            agent_cert_ttl=ttl,
            allowed_images=tuple(request.allowed_images),
            any_image=request.HasField("any_image") and request.any_image,
            pull_policy=request.pull_policy or None,
            runtime=request.runtime or None,
            egress_allow=tuple(request.egress_allow),
            no_egress=request.HasField("no_egress") and request.no_egress,
        )
        org = current_principal().org
        await ops.set_pool_policy(actor(self._admin, context), org, request.pool, change)
        return await self._pool(org, request.pool)

    @mapped
    async def PausePool(self, request: admin_pb2.PoolRef, context: Context) -> jobs_pb2.Pool:
        org = current_principal().org
        await ops.pause_pool(actor(self._admin, context), org, request.pool)
        return await self._pool(org, request.pool)

    @mapped
    async def ResumePool(self, request: admin_pb2.PoolRef, context: Context) -> jobs_pb2.Pool:
        org = current_principal().org
        await ops.resume_pool(actor(self._admin, context), org, request.pool)
        if self._admin.scheduler is not None:
            self._admin.scheduler.queued(org, request.pool)  # here, and on the other replicas
        return await self._pool(org, request.pool)

    @mapped
    async def IncidentAgent(
        self, request: admin_pb2.IncidentAgentRequest, context: Context
    ) -> admin_pb2.IncidentReport:
        since = since_from_pb(request.since) if request.HasField("since") else None
        if self._admin.logs is None:
            raise FailedPrecondition("this control plane reads no job logs")
        report = await agent_incident(
            actor(self._admin, context),
            self._admin.logs,
            current_principal().org,
            request.agent_id,
            since,
            await holders(self._admin),
        )
        return incident_to_pb(report, agent_to_pb(report.agent))

    async def _pool(self, org: str, pool: str) -> jobs_pb2.Pool:
        return pool_to_pb(await ops.pool_view(self._admin.store, org, pool, await holders(self._admin)))
