"""The Admin service's ``org:admin`` messages in the CLI's model (used by `cli/wire.py`):
API keys and users as `testhide admin` shows them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from testhide.cli.model import ApiKeyInfo, UserInfo
from testhide.protos.v1 import admin_pb2


def _time(message: Any, name: str) -> datetime | None:
    return getattr(message, name).ToDatetime(tzinfo=UTC) if message.HasField(name) else None


def api_key_from_pb(key: admin_pb2.ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=key.id,
        name=key.name,
        scopes=tuple(key.scopes),
        created_at=_time(key, "created_at"),
        expires_at=_time(key, "expires_at"),
        revoked_at=_time(key, "revoked_at"),
        state=key.state,
    )


def user_from_pb(user: admin_pb2.User) -> UserInfo:
    return UserInfo(
        name=user.name,
        scopes=tuple(user.scopes),
        created_at=_time(user, "created_at"),
        revoked_at=_time(user, "revoked_at"),
        mfa=user.mfa,
        state=user.state,
    )
