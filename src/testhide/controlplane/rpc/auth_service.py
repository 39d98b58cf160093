"""The Auth service: logins, refreshes, logout, the public signing keys, and
enrolling a user's TOTP second factor."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import grpc

from testhide.controlplane.auth.sessions import Sessions, TokenPair
from testhide.controlplane.auth.tokens import SigningKeys
from testhide.controlplane.errors import InvalidArgument
from testhide.controlplane.rpc.status import mapped
from testhide.protos.v1 import auth_pb2, auth_pb2_grpc


def _pair(pair: TokenPair) -> auth_pb2.TokenPair:
    now = datetime.now(UTC)
    return auth_pb2.TokenPair(
        access_token=pair.access_token,
        access_expires_in_s=int((pair.access_expires_at - now).total_seconds()),
        refresh_token=pair.refresh_token,
        refresh_expires_in_s=int((pair.refresh_expires_at - now).total_seconds()),
    )


def _password(p: auth_pb2.PasswordLogin) -> auth_pb2.PasswordLogin:
    if len(p.org) > 63 or len(p.user) > 128 or len(p.password) > 1024:
        raise InvalidArgument("org, user or password too long")
    return p


def _check_codes(*codes: str) -> None:
    if any(len(code) > 64 for code in codes):
        raise InvalidArgument("a second-factor code is at most 64 characters")


class AuthServicer(auth_pb2_grpc.AuthServicer):
    def __init__(self, sessions: Sessions, keys: SigningKeys) -> None:
        self._sessions = sessions
        self._keys = keys

    @mapped
    async def Login(
        self,
        request: auth_pb2.LoginRequest,
        context: grpc.aio.ServicerContext[auth_pb2.LoginRequest, auth_pb2.TokenPair],
    ) -> auth_pb2.TokenPair:
        match request.WhichOneof("credential"):
            case "api_key":
                return _pair(await self._sessions.login_api_key(request.api_key, context.peer()))
            case "password":
                p = _password(request.password)
                _check_codes(request.totp_code, request.recovery_code)
                return _pair(
                    await self._sessions.login_password(
                        p.org, p.user, p.password, context.peer(), request.totp_code, request.recovery_code
                    )
                )
        raise InvalidArgument("log in with an api_key or a password")

    @mapped
    async def EnrollMfa(
        self,
        request: auth_pb2.EnrollMfaRequest,
        context: grpc.aio.ServicerContext[auth_pb2.EnrollMfaRequest, auth_pb2.EnrollMfaResponse],
    ) -> auth_pb2.EnrollMfaResponse:
        p = _password(request.password)
        _check_codes(request.totp_code)
        enrollment = await self._sessions.enroll_mfa(
            p.org, p.user, p.password, request.totp_code, context.peer()
        )
        return auth_pb2.EnrollMfaResponse(
            otpauth_uri=enrollment.otpauth_uri,
            secret=enrollment.secret,
            recovery_codes=list(enrollment.recovery_codes),
        )

    @mapped
    async def ConfirmMfa(
        self,
        request: auth_pb2.ConfirmMfaRequest,
        context: grpc.aio.ServicerContext[auth_pb2.ConfirmMfaRequest, auth_pb2.ConfirmMfaResponse],
    ) -> auth_pb2.ConfirmMfaResponse:
        p = _password(request.password)
        _check_codes(request.totp_code)
        await self._sessions.confirm_mfa(p.org, p.user, p.password, request.totp_code, context.peer())
        return auth_pb2.ConfirmMfaResponse()

    @mapped
    async def Refresh(
        self,
        request: auth_pb2.RefreshRequest,
        context: grpc.aio.ServicerContext[auth_pb2.RefreshRequest, auth_pb2.TokenPair],
    ) -> auth_pb2.TokenPair:
        return _pair(await self._sessions.refresh(request.refresh_token, context.peer()))

    @mapped
    async def Logout(
        self,
        request: auth_pb2.RefreshRequest,
        context: grpc.aio.ServicerContext[auth_pb2.RefreshRequest, auth_pb2.LogoutResponse],
    ) -> auth_pb2.LogoutResponse:
        await self._sessions.logout(request.refresh_token)
        return auth_pb2.LogoutResponse()

    @mapped
    async def GetSigningKeys(
        self,
        request: auth_pb2.GetSigningKeysRequest,
        context: grpc.aio.ServicerContext[auth_pb2.GetSigningKeysRequest, auth_pb2.SigningKeys],
    ) -> auth_pb2.SigningKeys:
        return auth_pb2.SigningKeys(jwks_json=json.dumps(self._keys.jwks(), sort_keys=True))
