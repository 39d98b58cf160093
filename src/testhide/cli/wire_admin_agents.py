"""The Admin service's ``agents:admin`` messages, and `Jobs.ListPools`'s pools, in the CLI's
model (used by `cli/wire.py`): enrollment tokens, agents and pools as `testhide admin` and
`testhide pools list` show them."""

from __future__ import annotations

from testhide.cli.model import AgentInfo, EnrollmentTokenInfo, PoolInfo
from testhide.cli.wire_convert import time_of
from testhide.protos.v1 import admin_pb2, jobs_pb2


def token_from_pb(token: admin_pb2.EnrollmentToken) -> EnrollmentTokenInfo:
    return EnrollmentTokenInfo(
        id=token.id,
        pool=token.pool,
        created_at=time_of(token, "created_at"),
        expires_at=time_of(token, "expires_at"),
        used_at=time_of(token, "used_at"),
        revoked_at=time_of(token, "revoked_at"),
        state=token.state,
    )


def enrolled_agent_from_pb(agent: admin_pb2.Agent) -> AgentInfo:
    return AgentInfo(
        id=agent.id,
        name=agent.name,
        pool=agent.pool,
        host=agent.host,
        version=agent.version,
        labels=dict(agent.labels),
        runtimes=tuple(agent.runtimes),
        max_jobs=agent.max_jobs,
        running_jobs=agent.running_jobs,
        state=agent.state,
        enrolled_at=time_of(agent, "enrolled_at"),
        last_seen_at=time_of(agent, "last_seen_at"),
        cert_not_after=time_of(agent, "cert_not_after"),
        revoked_at=time_of(agent, "revoked_at"),
    )


def pool_from_pb(pool: jobs_pb2.Pool) -> PoolInfo:
    return PoolInfo(
        name=pool.name,
        paused=pool.paused,
        allowed_images=tuple(pool.allowed_images),
        pull_policy=pool.pull_policy,
        runtime=pool.runtime,
        agent_cert_ttl_s=pool.agent_cert_ttl.ToTimedelta().total_seconds()
        if pool.HasField("agent_cert_ttl")
        else None,
        agents_enrolled=pool.agents_enrolled,
        agents_connected=pool.agents_connected,
        jobs_queued=pool.jobs_queued,
        jobs_running=pool.jobs_running,
        created_at=time_of(pool, "created_at"),
        egress_allow=tuple(pool.egress_allow),
    )
