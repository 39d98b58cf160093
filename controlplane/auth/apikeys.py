"""API keys as bearer credentials on the API port."""

from __future__ import annotations

import structlog

from controlplane.auth.principal import Principal
from controlplane.auth.secrets import hash_secret, parse_api_key, same_hash
from controlplane.errors import Unauthenticated
from controlplane.store.base import Store

log = structlog.get_logger("testhide.auth")


class ApiKeyAuthenticator:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal behind an ``authorization: Bearer ...`` value. Every
        failure is the same UNAUTHENTICATED, so callers cannot probe keys."""
        if not authorization:
            raise Unauthenticated("missing credentials: send 'authorization: Bearer <api key>'")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise Unauthenticated("invalid credentials")
        try:
            parsed = parse_api_key(value.strip())
            record = await self._store.get_api_key(parsed.key_id)
            if record is None or record.revoked_at is not None:
                raise Unauthenticated("invalid credentials")
            if not same_hash(record.secret_hash, hash_secret(parsed.secret)):
                raise Unauthenticated("invalid credentials")
        except Unauthenticated:
            log.warning("authentication_failed", kind="api_key")
            raise Unauthenticated("invalid credentials") from None
        return Principal("api_key", record.id, record.org, frozenset(record.scopes))
