"""The Session service: who the caller's access token says it is. Open to any
valid access token whatever its scopes (``rpc/auth.py`` admits it as
authenticated-only), so that `testhide whoami` works for a credential that may
do nothing else."""

from __future__ import annotations

import grpc

from testhide import __version__
from testhide.controlplane.auth.principal import Principal
from testhide.controlplane.auth.store import CredentialStore
from testhide.controlplane.auth.tokens import AccessTokens
from testhide.controlplane.rpc.auth import current_principal
from testhide.controlplane.rpc.convert import timestamp
from testhide.controlplane.rpc.status import mapped
from testhide.protos.v1 import auth_pb2, auth_pb2_grpc


def _bearer(context: grpc.aio.ServicerContext[auth_pb2.WhoAmIRequest, auth_pb2.WhoAmIResponse]) -> str:
    """The access token the interceptor admitted (it checked the header's form)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value.partition(" ")[2].strip()
    return ""


class SessionServicer(auth_pb2_grpc.SessionServicer):
    def __init__(self, tokens: AccessTokens, users: CredentialStore) -> None:
        self._tokens = tokens
        self._users = users

    async def _principal_name(self, principal: Principal) -> str:
        """A user by name (a token carries the user's id); an API key by its id."""
        if principal.kind != "user":
            return principal.id
        user = await self._users.get_user(principal.org, principal.id)
        return user.name if user is not None else principal.id

    @mapped
    async def WhoAmI(
        self,
        request: auth_pb2.WhoAmIRequest,
        context: grpc.aio.ServicerContext[auth_pb2.WhoAmIRequest, auth_pb2.WhoAmIResponse],
    ) -> auth_pb2.WhoAmIResponse:
        principal = current_principal()
        # Verified already by the interceptor, so this is its cache: only the expiry is wanted.
        claims = self._tokens.verify(_bearer(context))
        return auth_pb2.WhoAmIResponse(
            org=principal.org,
            principal_kind=principal.kind,
            principal_id=await self._principal_name(principal),
            scopes=sorted(principal.scopes),
            access_expires_at=timestamp(claims.expires_at),
            amr=list(principal.amr),
            server_version=__version__,
        )
