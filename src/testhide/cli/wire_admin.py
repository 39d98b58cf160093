"""The Admin service's calls (and `Jobs.ListPools`) of the CLI's client: `testhide admin …`
and `testhide pools list`. A mixin of `ControlPlaneClient` (`cli/wire.py`), which provides
the channel, the session's bearer token and the one way to make a call."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc

from testhide.cli.model import (
    AgentInfo,
    ApiKeyInfo,
    EnrollmentTokenInfo,
    PoolChange,
    PoolInfo,
    Secret,
    UserInfo,
)
from testhide.cli.wire_admin_agents import (
    enrolled_agent_from_pb,
    incident_from_pb,
    pool_from_pb,
    token_from_pb,
)
from testhide.cli.wire_admin_org import api_key_from_pb, user_from_pb
from testhide.cli.wire_convert import secret_from_pb
from testhide.protos.v1 import admin_pb2, admin_pb2_grpc, jobs_pb2, jobs_pb2_grpc

T = TypeVar("T")


class AdminCalls(abc.ABC):
    """The Admin calls of `ControlPlaneClient`; what they need of it is declared
    here as abstract, and defined there."""

    _channel: grpc.aio.Channel | None

    @abc.abstractmethod
    async def _bearer(self) -> tuple[tuple[str, str], ...]: ...

    @abc.abstractmethod
    async def _call(self, rpc: Callable[[], Awaitable[T]]) -> T: ...

    @property
    @abc.abstractmethod
    def _jobs(self) -> jobs_pb2_grpc.JobsAsyncStub: ...

    # administration of the organisation: API keys, users, secrets (org:admin; cli/admin_org.py)
    @property
    def _admin(self) -> admin_pb2_grpc.AdminAsyncStub:
        assert self._channel is not None, "opened by _call or _bearer"
        return admin_pb2_grpc.AdminStub(self._channel)

    async def create_api_key(
        self, name: str, scopes: tuple[str, ...], expires_in: timedelta | None
    ) -> tuple[str, ApiKeyInfo]:
        """The key (shown once) and what is stored of it."""
        request = admin_pb2.CreateApiKeyRequest(name=name, scopes=list(scopes))
        if expires_in is not None:
            request.expires_in.FromTimedelta(expires_in)
        metadata = await self._bearer()
        response = await self._call(lambda: self._admin.CreateApiKey(request, metadata=metadata, timeout=30))
        return response.api_key, api_key_from_pb(response.info)

    async def api_keys(self) -> list[ApiKeyInfo]:
        metadata = await self._bearer()
        request = admin_pb2.ListApiKeysRequest()
        response = await self._call(lambda: self._admin.ListApiKeys(request, metadata=metadata, timeout=30))
        return [api_key_from_pb(k) for k in response.keys]

    async def revoke_api_key(self, key_id: str) -> ApiKeyInfo:
        metadata = await self._bearer()
        request = admin_pb2.RevokeApiKeyRequest(key_id=key_id)
        return api_key_from_pb(
            await self._call(lambda: self._admin.RevokeApiKey(request, metadata=metadata, timeout=30))
        )

    async def create_user(self, name: str, scopes: tuple[str, ...], password: str) -> UserInfo:
        metadata = await self._bearer()
        request = admin_pb2.CreateUserRequest(name=name, scopes=list(scopes), password=password)
        return user_from_pb(
            await self._call(lambda: self._admin.CreateUser(request, metadata=metadata, timeout=30))
        )

    async def users(self) -> list[UserInfo]:
        metadata = await self._bearer()
        request = admin_pb2.ListUsersRequest()
        response = await self._call(lambda: self._admin.ListUsers(request, metadata=metadata, timeout=30))
        return [user_from_pb(u) for u in response.users]

    async def revoke_user(self, name: str) -> UserInfo:
        metadata = await self._bearer()
        request = admin_pb2.RevokeUserRequest(name=name)
        return user_from_pb(
            await self._call(lambda: self._admin.RevokeUser(request, metadata=metadata, timeout=30))
        )

    async def admin_secrets(self) -> list[Secret]:
        """With each one's last use (as `secrets`, under the org:admin scope)."""
        metadata = await self._bearer()
        request = jobs_pb2.ListSecretsRequest()
        response = await self._call(lambda: self._admin.ListSecrets(request, metadata=metadata, timeout=30))
        return [secret_from_pb(s) for s in response.secrets]

    # enrollment tokens, agents, pools (agents:admin; cli/admin.py); pools (jobs:read)
    async def create_enrollment_token(self, pool: str, ttl: timedelta) -> tuple[str, EnrollmentTokenInfo]:
        """The token (shown once) and what is stored of it."""
        request = admin_pb2.CreateEnrollmentTokenRequest(pool=pool)
        request.ttl.FromTimedelta(ttl)
        metadata = await self._bearer()
        response = await self._call(
            lambda: self._admin.CreateEnrollmentToken(request, metadata=metadata, timeout=30)
        )
        return response.token, token_from_pb(response.info)

    async def enrollment_tokens(self) -> list[EnrollmentTokenInfo]:
        metadata = await self._bearer()
        request = admin_pb2.ListEnrollmentTokensRequest()
        response = await self._call(
            lambda: self._admin.ListEnrollmentTokens(request, metadata=metadata, timeout=30)
        )
        return [token_from_pb(t) for t in response.tokens]

    async def revoke_enrollment_token(self, token_id: str) -> EnrollmentTokenInfo:
        metadata = await self._bearer()
        request = admin_pb2.RevokeEnrollmentTokenRequest(token_id=token_id)
        return token_from_pb(
            await self._call(
                lambda: self._admin.RevokeEnrollmentToken(request, metadata=metadata, timeout=30)
            )
        )

    async def agents(self) -> list[AgentInfo]:
        metadata = await self._bearer()
        request = admin_pb2.ListAgentsRequest()
        response = await self._call(lambda: self._admin.ListAgents(request, metadata=metadata, timeout=30))
        return [enrolled_agent_from_pb(a) for a in response.agents]

    async def revoke_agent(self, agent_id: str) -> tuple[AgentInfo, list[str]]:
        """The agent, and the jobs that were running on it (now ERROR)."""
        metadata = await self._bearer()
        request = admin_pb2.RevokeAgentRequest(agent_id=agent_id)
        response = await self._call(lambda: self._admin.RevokeAgent(request, metadata=metadata, timeout=30))
        return enrolled_agent_from_pb(response.agent), list(response.jobs_ended)

    async def incident_agent(self, agent_id: str, since: datetime | None) -> dict[str, Any]:
        """Everything the agent touched, as `--json` prints it (`incident_from_pb`)."""
        metadata = await self._bearer()
        request = admin_pb2.IncidentAgentRequest(agent_id=agent_id)
        if since is not None:
            request.since.FromDatetime(since.astimezone(UTC))
        response = await self._call(lambda: self._admin.IncidentAgent(request, metadata=metadata, timeout=60))
        return incident_from_pb(response)

    async def create_pool(self, pool: str, agent_cert_ttl: timedelta | None) -> PoolInfo:
        request = admin_pb2.CreatePoolRequest(pool=pool)
        if agent_cert_ttl is not None:
            request.agent_cert_ttl.FromTimedelta(agent_cert_ttl)
        metadata = await self._bearer()
        return pool_from_pb(
            await self._call(lambda: self._admin.CreatePool(request, metadata=metadata, timeout=30))
        )

    async def set_pool_policy(self, pool: str, change: PoolChange) -> PoolInfo:
        request = admin_pb2.SetPoolPolicyRequest(
            pool=pool,
            allowed_images=list(change.allowed_images),
            pull_policy=change.pull_policy or "",
            runtime=change.runtime or "",
            egress_allow=list(change.egress_allow),
        )
        if change.any_image:
            request.any_image = True
        if change.no_egress:
            request.no_egress = True
        if change.agent_cert_ttl is not None:
            request.agent_cert_ttl.FromTimedelta(change.agent_cert_ttl)
        metadata = await self._bearer()
        return pool_from_pb(
            await self._call(lambda: self._admin.SetPoolPolicy(request, metadata=metadata, timeout=30))
        )

    async def pause_pool(self, pool: str, paused: bool) -> PoolInfo:
        """Pause (``paused``) or resume the pool."""
        metadata = await self._bearer()
        request = admin_pb2.PoolRef(pool=pool)
        return pool_from_pb(
            await self._call(
                lambda: (self._admin.PausePool if paused else self._admin.ResumePool)(
                    request, metadata=metadata, timeout=30
                )
            )
        )

    async def pools(self) -> list[PoolInfo]:
        metadata = await self._bearer()
        request = jobs_pb2.ListPoolsRequest()
        response = await self._call(lambda: self._jobs.ListPools(request, metadata=metadata, timeout=30))
        return [pool_from_pb(p) for p in response.pools]
