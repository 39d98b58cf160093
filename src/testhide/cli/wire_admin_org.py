"""The Admin service's ``org:admin`` messages in the CLI's model (used by `cli/wire.py`):
API keys and users as `testhide admin` shows them."""

from __future__ import annotations

from testhide.cli.model import ApiKeyInfo, UserInfo
from testhide.cli.wire_convert import time_of
from testhide.protos.v1 import admin_pb2


def api_key_from_pb(key: admin_pb2.ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=key.id,
        name=key.name,
        scopes=tuple(key.scopes),
        created_at=time_of(key, "created_at"),
        expires_at=time_of(key, "expires_at"),
        revoked_at=time_of(key, "revoked_at"),
        state=key.state,
    )


def user_from_pb(user: admin_pb2.User) -> UserInfo:
    return UserInfo(
        name=user.name,
        scopes=tuple(user.scopes),
        created_at=time_of(user, "created_at"),
        revoked_at=time_of(user, "revoked_at"),
        mfa=user.mfa,
        state=user.state,
    )
