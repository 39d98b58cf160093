"""The Admin service's ``org:admin`` methods: API keys, users, the secrets listing.

Each decodes, calls `operations.access` with the caller as actor, the caller's
organisation as the only one it touches and the caller's scopes as the most it may
grant, and encodes. The password of `CreateUser` is hashed and never echoed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.duration_pb2 import Duration

from testhide.controlplane.errors import InvalidArgument
from testhide.controlplane.operations import access
from testhide.controlplane.rpc.admin_context import AdminBase, actor
from testhide.controlplane.rpc.auth import current_principal
from testhide.controlplane.rpc.convert import timestamp
from testhide.controlplane.rpc.jobs import secret_to_pb
from testhide.controlplane.rpc.status import mapped
from testhide.controlplane.store.base import ApiKeyRecord, UserRecord
from testhide.protos.v1 import admin_pb2, jobs_pb2

_MAX_SECONDS = int(access.MAX_KEY_LIFETIME.total_seconds())


def expires_in_from_pb(request: admin_pb2.CreateApiKeyRequest) -> timedelta | None:
    """Unset: no expiry. Checked before conversion: a huge Duration would overflow timedelta."""
    if not request.HasField("expires_in"):
        return None
    value: Duration = request.expires_in
    if not 0 < value.seconds <= _MAX_SECONDS or not 0 <= value.nanos < 1_000_000_000:
        raise InvalidArgument(
            f"expires_in must be from 1s to {access.lifetime_text(access.MAX_KEY_LIFETIME)}"
        )
    return timedelta(seconds=value.seconds)


def api_key_to_pb(key: ApiKeyRecord, now: datetime) -> admin_pb2.ApiKey:
    message = admin_pb2.ApiKey(
        id=key.id,
        name=key.name,
        scopes=list(key.scopes),
        created_at=timestamp(key.created_at),
        state=access.api_key_state(key, now),
    )
    if key.expires_at is not None:
        message.expires_at.CopyFrom(timestamp(key.expires_at))
    if key.revoked_at is not None:
        message.revoked_at.CopyFrom(timestamp(key.revoked_at))
    return message


def user_to_pb(user: UserRecord, mfa: bool = False) -> admin_pb2.User:
    message = admin_pb2.User(
        name=user.name,
        scopes=list(user.scopes),
        created_at=timestamp(user.created_at),
        state=access.user_state(user),
        mfa=mfa,
    )
    if user.revoked_at is not None:
        message.revoked_at.CopyFrom(timestamp(user.revoked_at))
    return message


class OrgAdmin(AdminBase):
    @mapped
    async def CreateApiKey(
        self,
        request: admin_pb2.CreateApiKeyRequest,
        context: grpc.aio.ServicerContext[admin_pb2.CreateApiKeyRequest, admin_pb2.CreateApiKeyResponse],
    ) -> admin_pb2.CreateApiKeyResponse:
        principal = current_principal()
        key, record = await access.create_api_key(
            actor(self._admin, context),
            principal.org,
            request.name,
            request.scopes,
            expires_in_from_pb(request),
            principal.scopes,
        )
        return admin_pb2.CreateApiKeyResponse(api_key=key, info=api_key_to_pb(record, datetime.now(UTC)))

    @mapped
    async def ListApiKeys(
        self,
        request: admin_pb2.ListApiKeysRequest,
        context: grpc.aio.ServicerContext[admin_pb2.ListApiKeysRequest, admin_pb2.ListApiKeysResponse],
    ) -> admin_pb2.ListApiKeysResponse:
        keys = await access.list_api_keys(actor(self._admin, context), current_principal().org)
        now = datetime.now(UTC)
        return admin_pb2.ListApiKeysResponse(keys=[api_key_to_pb(k, now) for k in keys])

    @mapped
    async def RevokeApiKey(
        self,
        request: admin_pb2.RevokeApiKeyRequest,
        context: grpc.aio.ServicerContext[admin_pb2.RevokeApiKeyRequest, admin_pb2.ApiKey],
    ) -> admin_pb2.ApiKey:
        key = await access.revoke_api_key(
            actor(self._admin, context), current_principal().org, request.key_id
        )
        return api_key_to_pb(key, datetime.now(UTC))

    @mapped
    async def CreateUser(
        self,
        request: admin_pb2.CreateUserRequest,
        context: grpc.aio.ServicerContext[admin_pb2.CreateUserRequest, admin_pb2.User],
    ) -> admin_pb2.User:
        principal = current_principal()
        passwords = self._admin.passwords
        user = await access.create_user(
            actor(self._admin, context),
            principal.org,
            request.name,
            request.scopes,
            request.password,
            principal.scopes,
            *((passwords.hash,) if passwords is not None else ()),
        )
        return user_to_pb(user)

    @mapped
    async def ListUsers(
        self,
        request: admin_pb2.ListUsersRequest,
        context: grpc.aio.ServicerContext[admin_pb2.ListUsersRequest, admin_pb2.ListUsersResponse],
    ) -> admin_pb2.ListUsersResponse:
        users = await access.list_users(actor(self._admin, context), current_principal().org)
        return admin_pb2.ListUsersResponse(users=[user_to_pb(u, mfa) for u, mfa in users])

    @mapped
    async def RevokeUser(
        self,
        request: admin_pb2.RevokeUserRequest,
        context: grpc.aio.ServicerContext[admin_pb2.RevokeUserRequest, admin_pb2.User],
    ) -> admin_pb2.User:
        user = await access.revoke_user(actor(self._admin, context), current_principal().org, request.name)
        return user_to_pb(user)

    @mapped
    async def ListSecrets(
        self,
        request: jobs_pb2.ListSecretsRequest,
        context: grpc.aio.ServicerContext[jobs_pb2.ListSecretsRequest, jobs_pb2.ListSecretsResponse],
    ) -> jobs_pb2.ListSecretsResponse:
        found = await access.list_secrets(actor(self._admin, context), current_principal().org)
        return jobs_pb2.ListSecretsResponse(secrets=[secret_to_pb(s) for s in found])
