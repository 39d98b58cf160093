"""Authentication and authorisation of every API-port RPC, in one place. A
method missing from the table is refused: new RPCs fail closed."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from controlplane.auth.apikeys import ApiKeyAuthenticator
from controlplane.auth.principal import Principal
from controlplane.errors import ControlPlaneError, PermissionDenied
from controlplane.rpc.status import code_for

PUBLIC = frozenset({
    "/testhide.v1.Enrollment/Enroll",  # the token in the request is the credential
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
})
SCOPE_OF_METHOD = {
    "/testhide.v1.Jobs/Submit": "jobs:write",
    "/testhide.v1.Jobs/Cancel": "jobs:write",
    "/testhide.v1.Jobs/Get": "jobs:read",
    "/testhide.v1.Jobs/List": "jobs:read",
    "/testhide.v1.Jobs/FollowLogs": "jobs:read",
    "/testhide.v1.Jobs/UploadWorkspace": "jobs:write",
    "/testhide.v1.Jobs/ListArtifacts": "jobs:read",
    "/testhide.v1.Jobs/DownloadArtifact": "jobs:read",
    "/testhide.v1.Jobs/GetTestResults": "jobs:read",
    "/testhide.v1.Secrets/Set": "secrets:write",
    "/testhide.v1.Secrets/Delete": "secrets:write",
    "/testhide.v1.Secrets/List": "jobs:read",
}

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def current_principal() -> Principal:
    """The caller of the RPC being served; set only after authentication."""
    return _principal.get()


def _rebuild(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that runs ``behaviour``."""
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(behaviour, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def _refusal(handler: grpc.RpcMethodHandler, exc: ControlPlaneError) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code_for(exc), str(exc))

    return _rebuild(handler, refuse)


def _with_principal(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    inner = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
    if not handler.response_streaming:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _principal.set(principal)
            return await inner(request, context)

        return _rebuild(handler, unary)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _principal.set(principal)
        async for item in inner(request, context):
            yield item

    return _rebuild(handler, stream)


class ApiAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: ApiKeyAuthenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in PUBLIC:
            return handler
        try:
            scope = SCOPE_OF_METHOD.get(details.method)
            if scope is None:
                raise PermissionDenied(f"method {details.method} is not open to API callers")
            metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
            principal = await self._authenticator.authenticate(metadata.get("authorization"))
            principal.require(scope)
        except ControlPlaneError as exc:
            return _refusal(handler, exc)
        return _with_principal(handler, principal)
